"""The ingest layer's settings: how `twostage ingest` reads, batches and reports."""

from pydantic import BaseModel, Field

from twostage.retrieval.core.settings import available_cores
from twostage.retrieval.store.settings import IndexSettings


class IngestSettings(BaseModel):
    """How `twostage ingest` reads, batches and reports."""

    batch_tokens: int | None = Field(None, ge=64, description="embedder token budget (None: embedder's)")
    lookup_docs: int = Field(256, ge=1, description="documents whose stored state is read in one call")
    queue_batches: int = Field(4, ge=1, le=64, description="batches in flight between the pipeline stages")
    max_document_chars: int = Field(5_000_000, ge=1000, description="larger documents are reported, skipped")
    progress_interval_s: float = Field(5.0, gt=0, description="seconds between progress lines (no tty)")
    workers: int = Field(
        default_factory=available_cores, ge=1, le=256,
        description="processes extracting documents (PDF, Word, HTML) from a folder (default: the cores)",
    )  # fmt: skip
    optimize_after: int = Field(
        5000, ge=0, description="optimise (rebuild HNSW) once this many points were written since the last "
        "time; smaller jobs stay in the appendable segment, searched exactly, so searches are not held up",
    )  # fmt: skip


class IngestionSettings(IndexSettings):
    """What an ingestion job reads."""

    ingest: IngestSettings = Field(default_factory=IngestSettings)
