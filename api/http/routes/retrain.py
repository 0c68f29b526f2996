"""`POST /v1/retrain`: the retrain cycle run inside the service, which owns the embedded store;
`POST /v1/calibrate`: the current deployment's calibration fitted on judged queries, likewise.

The pairs travel in the request (validated here, bad lines listed) and are written to the
registry's uploads folder, then the cycle runs as a background job on the same worker as
ingestion; the service follows the promoted deployment when the job switches the pointer.
"""

import json
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import AdminAccess, CallerDep, ServiceDep
from twostage.api.runtime.jobs import Job
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.deployments.registry import Registry
from twostage.retrieval.store.vector_store import check_collection_name
from twostage.training.data import Judgement, Pair, parse_example

router = APIRouter(tags=["retrain"], dependencies=[AdminAccess])


class RetrainRequest(BaseModel):
    collection: str | None = None
    pairs: list[dict[str, Any]] = Field(
        min_length=1, description="{query, positive} records, or {query, doc_id | id, negative_ids?} by id"
    )
    dev: list[dict[str, Any]] | None = Field(None, description="held-out pairs (default: split of pairs)")
    from_base: bool = False
    skip_embedder: bool = False
    skip_reranker: bool = False
    promote: bool = True
    dry_run: bool = False
    source: str | None = Field(None, max_length=200, description="what the pairs are, for the run's record")
    canary: float | None = Field(None, gt=0, le=1, description="serve a promoted pair to this share first")
    interleave: bool = False
    canary_events: int | None = Field(None, ge=1)
    canary_seconds: float | None = Field(None, gt=0)


def _write_pairs(rows: list[dict[str, Any]], path: Path, field: str) -> list[str]:
    """Keep the rows that parse as pairs (by text or by id); return 'field[i]: reason' for the others."""
    kept, rejected = [], []
    for i, row in enumerate(rows):
        try:
            example = parse_example(row)
        except ValueError as exc:
            rejected.append(f"{field}[{i}]: {exc}")
            continue
        if not isinstance(example, Pair | Judgement):
            rejected.append(f"{field}[{i}]: not a {{query, positive}} or {{query, doc_id | id}} pair")
            continue
        kept.append(json.dumps(row, ensure_ascii=False))
    if not kept:
        raise InputError(f"no usable {field}: {'; '.join(rejected[:5])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return rejected


@router.post("/v1/retrain", status_code=202)
async def start_retrain(body: RetrainRequest, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    """Queue a retrain of `collection`; poll `GET /v1/jobs/{id}` (its log shows the steps)."""
    from twostage.training.retrain import retrain
    from twostage.training.retrain_run import RetrainOptions

    name = check_collection_name(body.collection or service.settings.collection)
    settings = service.settings.model_copy(deep=True)
    settings.collection = name
    uploads = Registry(settings).root / "uploads"
    token = uuid.uuid4().hex
    rejected = await run_in_threadpool(_write_pairs, body.pairs, uploads / f"{token}.pairs.jsonl", "pairs")
    dev_path = uploads / f"{token}.dev.jsonl" if body.dev else None
    if body.dev and dev_path is not None:  # the disk is written off the event loop
        rejected += await run_in_threadpool(_write_pairs, body.dev, dev_path, "dev")
    options = RetrainOptions(
        pairs=uploads / f"{token}.pairs.jsonl", dev=dev_path, from_base=body.from_base,
        skip_embedder=body.skip_embedder, skip_reranker=body.skip_reranker, promote=body.promote,
        dry_run=body.dry_run, source=body.source, canary=body.canary, interleave=body.interleave,
        canary_events=body.canary_events, canary_seconds=body.canary_seconds,
    )  # fmt: skip
    assert service.jobs is not None and service.store is not None
    store = service.store

    def work(job: Job) -> dict[str, Any]:
        return retrain(settings, store, options, say=job.say, models=service.models)

    job = service.jobs.submit_work(name, "retrain", work, owner=caller.key)
    return {"job_id": job.id, "status": job.status, "rejected": rejected}


class CalibrateRequest(BaseModel):
    collection: str | None = None
    judgements: list[dict[str, Any]] = Field(
        min_length=1, max_length=100_000,
        description="{query, doc_id}, {query, id} (a chunk) or {query, positive}, instruction?",
    )  # fmt: skip
    source: str = Field("judgements sent to /v1/calibrate", max_length=500, description="named in the record")


@router.post("/v1/calibrate")
async def calibrate_route(body: CalibrateRequest, service: ServiceDep) -> dict[str, Any]:
    """Fit the current deployment's calibrated relevance (`twostage calibrate` through the server):
    the judged queries are searched as the service serves them, through its own models."""
    from twostage.training.calibration import calibrate
    from twostage.training.data import Judgement, parse_judgement

    name = check_collection_name(body.collection or service.settings.collection)
    settings = service.settings.model_copy(deep=True)
    settings.collection = name
    judgements, said = [], []
    for i, row in enumerate(body.judgements):
        try:
            parsed = parse_judgement(row)
        except ValueError as exc:
            said.append(f"skipped judgements[{i}]: {exc}")
            continue
        if isinstance(parsed, Judgement):
            judgements.append(parsed)
        else:
            said.append(f"skipped judgements[{i}]: {parsed.reason}")
    if not judgements:
        raise InputError(f"no usable judgements: {'; '.join(said[:5])}")
    assert service.store is not None and service.served is not None
    record = await run_in_threadpool(
        calibrate, settings, service.store, judgements, body.source, said.append,
        lambda _: service.deployment(name), service,
    )  # fmt: skip
    await run_in_threadpool(service.served.refresh, name)  # served from the next request on
    return {"deployment": record.id, "calibration": record.calibration, "said": said}
