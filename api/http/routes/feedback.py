"""`POST /v1/feedback`: what users did with a search's hits; `GET /v1/feedback/stats`: the sum.

A batch is stored whole or not at all (`TrafficLog.record`): each event names a search of the
log's retention window (else 404 naming it) and a chunk (`id`) or document (`doc_id`) that search
showed (else 400). Events are idempotent by `event_id` (without one, by their content), so a
client resends a batch after a timeout without counting anything twice. Sending needs the write
key where keys are configured; each client has a request rate (429 past it).
"""

import time
from dataclasses import asdict
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from twostage.api.http.deps import CallerDep, FeedbackAccess, ServiceDep
from twostage.retrieval.access.caller import Caller
from twostage.retrieval.core.errors import TooLarge
from twostage.retrieval.traffic.log import Event, EventKind, content_id
from twostage.retrieval.traffic.stats import traffic_stats

router = APIRouter(tags=["feedback"])


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    search_id: str = Field(min_length=1, max_length=64, description="from the search's response")
    id: str | None = Field(None, min_length=1, max_length=256, description="the chunk (a hit's id)")
    doc_id: str | None = Field(None, min_length=1, max_length=1024, description="or the document")
    event: Literal["click", "cited", "thumbs_up", "thumbs_down", "dwell"]
    value: float | None = Field(
        None,
        allow_inf_nan=False,
        description="dwell: seconds spent (required); others: a grade, kept as sent",
    )
    ts: AwareDatetime | None = Field(
        None, description="when it happened: ISO 8601 with a UTC offset, or seconds since the epoch "
        "(default: when it arrives)",
    )  # fmt: skip
    event_id: str | None = Field(
        None, min_length=1, max_length=128, description="the client's id; an event resent with it is "
        "stored once (without one, an identical event is)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_target(self) -> "FeedbackEvent":
        if (self.id is None) == (self.doc_id is None):
            raise ValueError("name the hit by its chunk 'id' or its 'doc_id' (one of them)")
        if self.event == "dwell" and (self.value is None or self.value < 0):
            raise ValueError("a dwell event needs 'value': the seconds spent (>= 0)")
        return self

    def stored(self, received: float) -> Event:
        ts = self.ts.timestamp() if isinstance(self.ts, datetime) else None
        kind: EventKind = self.event
        event_id = self.event_id or content_id(self.search_id, self.id, self.doc_id, kind, self.value, ts)
        return Event(event_id, self.search_id, self.id, self.doc_id, kind, self.value,
                     received if ts is None else ts)  # fmt: skip


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEvent] = Field(
        min_length=1, description="at most feedback.max_events (1,000) a request; more get 413"
    )


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="events stored by this request")
    duplicates: int = Field(description="events already stored (same event_id), not counted again")


@router.post("/v1/feedback", response_model=FeedbackResponse)
async def feedback(
    body: FeedbackRequest, request: Request, service: ServiceDep, caller: Annotated[Caller, FeedbackAccess]
) -> FeedbackResponse:
    """Store a batch of feedback events, all or none, on the caller's own searches (an admin: any)."""
    # the client a rate applies to: its key, else (an open service) its address
    client = (
        f"key:{caller.key}" if caller.key else "address:" + (request.client.host if request.client else "-")
    )
    service.feedback_limiter.take(client)
    limit = service.settings.feedback.max_events
    if len(body.events) > limit:
        raise TooLarge(f"{len(body.events)} events in one request, at most {limit} (feedback.max_events)")
    assert service.traffic is not None
    received = time.time()
    recorded = await run_in_threadpool(
        service.traffic.record, [e.stored(received) for e in body.events], None, caller
    )
    return FeedbackResponse(accepted=recorded.accepted, duplicates=recorded.duplicates)


@router.get("/v1/feedback/stats")
async def feedback_stats(
    service: ServiceDep,
    caller: CallerDep,
    days: float = Query(7.0, gt=0, le=3650, description="the window, in days back from now"),
    low_relevance: float = Query(0.5, ge=0, le=1, description="a best hit below this is a low-score query"),
) -> dict[str, Any]:
    """Searches, events by type, click-through by rank, zero-hit and low-score queries: of the
    caller's own searches (an admin: all of them)."""
    owner = caller.log_owner()
    assert service.traffic is not None
    stats = await run_in_threadpool(partial(traffic_stats, service.traffic, days, low_relevance, key=owner))
    return asdict(stats)
