"""The whole settings tree (`Settings`), and the HTTP service's own section (`api`).

`Settings` is every layer's settings class at once (see `twostage.retrieval.core.settings`):
built once at the edge (a command's `main`, the app's factory) and handed down, each layer
reading it through its own narrower class.
"""

from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator

from twostage.retrieval.access.settings import AccessSettings
from twostage.training.settings import TrainingSettings

MOVED_TO_SEARCH = ("rerank", "rerank_k")  # api.X before the settings moved next to their layers


class ApiSettings(BaseModel):
    """The HTTP service: binding, auth, limits and micro-batching."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list, description="bearer keys; required for writes")
    keys_for_reads: bool = Field(False, description="also require a key for search/rerank/embeddings")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="larger file uploads (multipart POST /v1/documents) get 413"
    )
    cors_origins: list[str] = Field(default_factory=list, description='e.g. ["https://chat.example.com"]')
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="longest a request waits for a batch to fill"
    )
    micro_batching: bool = Field(
        True, description="gather concurrent requests' items into shared forward passes (false: one "
        "item per forward pass, for comparison)",
    )  # fmt: skip
    max_client_batch: int = Field(
        2048, ge=1, description="inputs or documents in one request; more get 413 (TEI and vLLM say 2048 too)"
    )
    max_pending: int = Field(
        8192, ge=1, description="queued items (texts, documents) per model; a request that would pass "
        "it gets 503 + Retry-After, all of its items together",
    )  # fmt: skip
    shutdown_timeout_s: int = Field(30, ge=1, description="grace period for in-flight requests on shutdown")
    alias_refresh_s: float = Field(1.0, ge=0, description="how often a collection alias is re-resolved")

    @model_validator(mode="after")
    def _one_request_fits_the_queue(self) -> "ApiSettings":
        if self.max_pending < self.max_client_batch:
            raise ValueError(
                f"api.max_pending ({self.max_pending}) must be at least api.max_client_batch "
                f"({self.max_client_batch}), or the largest request could never be admitted"
            )
        return self


class Settings(TrainingSettings):
    """The root of the settings tree."""

    api: ApiSettings = Field(default_factory=ApiSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)

    @model_validator(mode="before")
    @classmethod
    def _moved_sections(cls, data: Any) -> Any:
        """TWOSTAGE_API__RERANK and TWOSTAGE_API__RERANK_K are TWOSTAGE_SEARCH__* now; data
        directories keep the old names in `settings.env` (quickstart wrote them), so they still count."""
        if isinstance(data, dict) and isinstance(data.get("api"), dict):
            moved = {k: data["api"][k] for k in MOVED_TO_SEARCH if k in data["api"]}
            if moved:
                search = data.get("search")
                search = dict(search) if isinstance(search, dict) else {}
                data = {**data, "api": {k: v for k, v in data["api"].items() if k not in moved},
                        "search": {**moved, **search}}  # fmt: skip
        return data
