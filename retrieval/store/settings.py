"""The store layer's settings: the engine, recall, and the token windows a collection is cut in
(recorded in its manifest, so they are the index's, read by the chunker too)."""

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from twostage.retrieval.models.settings import ModelSettings
from twostage.retrieval.store.sparse import Bm25Params


class ChunkerSettings(BaseModel):
    """Token windows of the chunker, counted with Qwen3's tokenizer (tiktoken)."""

    tokens: int = Field(512, ge=16, le=32768, description="maximum tokens per chunk")
    overlap: int = Field(64, ge=0, description="tokens repeated from the end of the previous chunk")
    heading_context: bool = Field(
        True, description="embed each chunk with its heading path in front ('Guide > Install\\n\\n...'); "
        "on by default: on 174 section-title queries over Debian manuals it raised nDCG@10 0.380 -> 0.448 "
        "(paired, p = 0.0003; bench/documents.py). Documents without headings are embedded as they are",
    )  # fmt: skip

    @model_validator(mode="after")
    def _overlap_below_window(self) -> "ChunkerSettings":
        if self.overlap >= self.tokens // 2:
            raise ValueError(
                f"chunker overlap ({self.overlap}) must be below half the window ({self.tokens})"
            )
        return self


class StoreSettings(BaseModel):
    """Where vectors live: the embedded Qdrant Edge engine (default) or a Qdrant server/cluster."""

    kind: Literal["embedded", "qdrant"] = Field(
        "embedded",
        description="embedded: Qdrant Edge under data_dir; qdrant: qdrant-client (url or location)",
    )
    url: str | None = Field(None, description="Qdrant server URL, e.g. http://qdrant:6333 (kind=qdrant)")
    location: str | None = Field(
        None, description="qdrant-client local mode instead of a server: ':memory:' or a directory"
    )
    api_key: SecretStr | None = Field(None, description="Qdrant API key (kind=qdrant with url)")
    prefer_grpc: bool = Field(True, description="talk gRPC to the server (port grpc_port)")
    grpc_port: int = Field(6334, ge=1, le=65535)
    timeout_s: int = Field(60, ge=1)
    shard_number: int = Field(1, ge=1, description="shards per new collection (cluster scale-out)")
    replication_factor: int = Field(1, ge=1, description="copies of each shard (cluster)")
    hnsw_m: int = Field(16, ge=4, le=128)
    hnsw_ef_construct: int = Field(100, ge=8, le=4096)
    hnsw_ef: int | None = Field(None, ge=1, le=4096, description="search-time ef (None: engine default)")
    payload_indexes: dict[str, Literal["keyword", "integer", "float", "bool"]] = Field(
        default_factory=dict,
        description='extra payload fields to index for filters, e.g. {"metadata.section": "keyword"}',
    )


class RecallSettings(BaseModel):
    """The first stage: dense ANN, BM25 sparse, or both fused by reciprocal rank fusion."""

    sparse: bool = Field(True, description="new collections get BM25 sparse vectors next to dense ones")
    mode: Literal["dense", "sparse", "hybrid"] = Field(
        "hybrid", description="recall when a request does not say (collections without sparse "
        "vectors use dense and say so)",
    )  # fmt: skip
    rrf_k: int = Field(60, ge=1, description="RRF k, set explicitly (Qdrant's default is 2)")
    rrf_weights: tuple[float, float] = Field((1.0, 1.0), description="RRF weights of (dense, sparse)")
    bm25: Bm25Params = Field(default_factory=Bm25Params, description="BM25 of new collections")

    @model_validator(mode="after")
    def _weights_usable(self) -> "RecallSettings":
        if min(self.rrf_weights) < 0 or max(self.rrf_weights) == 0:
            raise ValueError(
                f"recall.rrf_weights {list(self.rrf_weights)} must be non-negative and not all zero"
            )
        return self


class IndexSettings(ModelSettings):
    """What building, reading and recalling from a collection reads."""

    chunker: ChunkerSettings = Field(default_factory=ChunkerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    recall: RecallSettings = Field(default_factory=RecallSettings)
