"""The search layer's settings: what a search does when its request does not say, and calibration."""

from typing import Literal

from pydantic import BaseModel, Field

from twostage.retrieval.store.settings import IndexSettings


class SearchSettings(BaseModel):
    """Defaults of `/v1/search` (and of every path that searches as it is served)."""

    rerank: bool | Literal["auto"] = Field(
        "auto", description="when a search request does not say: true, false, or auto (rerank only "
        "with a reranker trusted for the deployment: measured better than recall, or trained to rank)",
    )  # fmt: skip
    rerank_k: int | None = Field(
        5, ge=1, description="recalled chunks a search reranks, the rest follow in recall order (null: all "
        "top_k); a request may say. 5: measured by bench/rerank_depth.py (docs/benchmarks.md)",
    )  # fmt: skip


class CalibrationSettings(BaseModel):
    """Calibrated relevance (`retrieval.search.calibration`): what a fit judges and needs."""

    depth: int = Field(10, ge=1, le=100, description="hits per judged query labelled for the fit")
    min_judgements: int = Field(
        200, ge=20, description="judged hits a fit needs; fewer is refused (retrain keeps the record "
        "uncalibrated and says so)",
    )  # fmt: skip


class QuerySettings(IndexSettings):
    """What planning, running and calibrating a search reads."""

    search: SearchSettings = Field(default_factory=SearchSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
