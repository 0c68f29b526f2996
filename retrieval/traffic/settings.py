"""The traffic layer's settings: the search log and feedback events."""

from pydantic import BaseModel, Field, field_validator

from twostage.retrieval.traffic.database import check_url


class FeedbackSettings(BaseModel):
    """The search log and feedback events (`retrieval.traffic`): what is kept, how long, how fast."""

    search_log: bool = Field(
        True, description="log each search (query, instruction, filter, the hits shown, the deployment) "
        "in the log's database; off: feedback is still taken for search ids of the retention window",
    )  # fmt: skip
    database_url: str | None = Field(
        None, description="where the search log, feedback events, canary outcomes and coordination locks "
        "live: a SQLAlchemy URL; unset: SQLite at DATA_DIR/traffic.sqlite3 (one replica); "
        "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB: shared by replicas (docs/service.md, Replicas)",
    )  # fmt: skip
    store_query_text: bool = Field(
        True, description="keep the query's text in the log; false keeps only its SHA-256 (pairs from "
        "feedback then cannot be made: they need the text)",
    )  # fmt: skip
    retention_days: float = Field(
        90.0, gt=0, description="searches and events older than this are deleted, and feedback on them is 404"
    )
    max_events: int = Field(1000, ge=1, description="events in one POST /v1/feedback; more get 413")
    rate_per_s: float = Field(
        20.0, gt=0, description="feedback requests per second per API key (per client address without "
        "one); past the burst they get 429 + Retry-After",
    )  # fmt: skip
    burst: int = Field(100, ge=1, description="feedback requests a key may send at once before rate_per_s")
    clock_skew_s: float = Field(
        300.0, ge=0, description="how far an event's ts may lie after now or before its search"
    )
    pairs_min_rate: float = Field(
        0.0, ge=0, le=1, description="pairs from feedback: a positive needs a positive event in at least "
        "this share of its query's searches (fewer: a stray click); off by default, since on the bench 0.2 "
        "removed most wrong positives and trained a worse embedder; `pairs from-feedback --min-rate`",
    )  # fmt: skip

    @field_validator("database_url")
    @classmethod
    def _usable_url(cls, url: str | None) -> str | None:
        return check_url(url) if url else None  # empty (an unset variable in compose): the default
