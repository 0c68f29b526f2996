"""One settings tree for the whole service (env prefix `TWOSTAGE_`, nested with `__`).

Example: `TWOSTAGE_RERANKER__MODEL=/models/my-reranker TWOSTAGE_DEVICE=cpu twostage ...`.
Later packages (store, API, training) add their sections here rather than keeping their own.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from twostage.retrieval.models.prompts import DEFAULT_TASK
from twostage.retrieval.store.sparse import Bm25Params

DeviceName = Literal["auto", "cpu", "cuda", "mps"] | str
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class RemoteSettings(BaseModel):
    """A model server reached over HTTP (vLLM, TEI, Infinity, another twostage)."""

    url: str | None = Field(None, description="base URL, e.g. http://vllm-embed:8000 (routes are appended)")
    api_key: SecretStr | None = Field(None, description="sent as a bearer token")
    timeout_s: float = Field(30.0, gt=0, description="per HTTP attempt")
    retries: int = Field(3, ge=0, description="further attempts on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(0.2, ge=0, description="first retry delay; doubled each time, with +-50% jitter")
    breaker_failures: int = Field(5, ge=1, description="failed calls in a row that open the circuit")
    breaker_reset_s: float = Field(
        10.0, gt=0, description="open circuit: fail fast this long, then try again"
    )
    max_batch: int = Field(
        256, ge=1, description="inputs or documents per remote call; larger calls are split"
    )
    concurrency: int = Field(
        4, ge=1, description="batches in flight to the server at once (the service's batcher workers)"
    )
    escape_markers: bool = Field(
        True, description="a zero-width space after the '<' of chat markers in untrusted text, because the "
        "remote tokenizer may parse them as control tokens",
    )  # fmt: skip


def _require_url(backend: str, remote: RemoteSettings, role: str) -> None:
    if backend == "remote" and not remote.url:
        raise ValueError(f"{role}.backend is remote but {role}.remote.url is not set")


class EmbedderSettings(BaseModel):
    """Which embedding model to run and how to batch it."""

    model: str = Field(
        "Qwen/Qwen3-Embedding-0.6B",
        description="hub id, local directory or pypi:NAME; backend=remote: the name the server serves",
    )
    backend: Literal["local", "remote"] = Field(
        "local",
        description="local: in this process; remote: an OpenAI-compatible /v1/embeddings at remote.url",
    )
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    template: Literal["client", "server"] = Field(
        "client", description="backend=remote: client: queries leave with the Qwen3 query prompt applied "
        "here (vLLM, TEI, Infinity serving Qwen3-Embedding); server: raw queries marked input_type=query, "
        "with the instruction, for a server that applies its model's own query prompt (another twostage)",
    )  # fmt: skip
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    family: Literal["auto", "last-token", "sentence-transformers"] = Field(
        "auto",
        description="last-token: Qwen3-Embedding semantics; sentence-transformers: the model's own pooling",
    )
    max_length: int = Field(8192, ge=8, le=131072)
    batch_tokens: int = Field(16384, ge=64, description="padded tokens per forward pass")
    dim: int | None = Field(None, ge=8, description="Matryoshka output dimension (None = full)")
    instruction: str = Field(DEFAULT_TASK, min_length=1, description="default task for query prompts")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: dynamic int8 Linear layers (sentence-transformers embedders, on a CPU)"
    )

    @model_validator(mode="after")
    def _remote_has_url(self) -> "EmbedderSettings":
        _require_url(self.backend, self.remote, "embedder")
        return self


class RerankerSettings(BaseModel):
    """Which reranker to run and how to batch it."""

    model: str = Field(
        "Qwen/Qwen3-Reranker-0.6B",
        description="hub id, local directory or pypi:NAME; backend=remote: the name the server serves",
    )
    revision: str | None = None
    backend: Literal["local", "remote"] = Field(
        "local", description="local, or a rerank server at remote.url"
    )
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    protocol: Literal["cohere", "jina", "tei"] = Field(
        "jina", description="remote API: Cohere POST /v2/rerank, Jina/vLLM POST /v1/rerank, TEI POST /rerank"
    )
    template: Literal["server", "client"] = Field(
        "server", description="server: send raw text and the instruction (twostage, seq-cls models); client: "
        "send the Qwen3-Reranker prompt formatted here (vLLM serving the original Qwen3-Reranker)",
    )  # fmt: skip
    family: Literal["auto", "yes-no", "cross-encoder"] = Field(
        "auto",
        description="yes-no: causal LM judged by logit(yes)-logit(no); cross-encoder: sentence-transformers",
    )
    max_length: int = Field(8192, ge=64, le=131072)
    batch_tokens: int = Field(16384, ge=64, description="padded tokens per pass; caps a packed row")
    instruction: str = Field(DEFAULT_TASK, min_length=1, description="default <Instruct> of the prompt")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: dynamic int8 Linear layers (cross-encoders, on a CPU)"
    )
    fusion: Literal["rrf", "none"] = Field(
        "rrf", description="how reranked hits are ordered: rrf fuses the reranker's rank with the recall "
        "rank (measured better, docs/benchmarks.md), none orders by the reranker alone; a request may say",
    )  # fmt: skip
    fusion_k: int = Field(60, ge=1, description="RRF k of the rerank fusion")
    fusion_weight: float = Field(
        1.0, gt=0, le=1000, description="the reranker rank's RRF weight (the recall rank's is 1)"
    )

    @model_validator(mode="after")
    def _remote_has_url(self) -> "RerankerSettings":
        _require_url(self.backend, self.remote, "reranker")
        return self


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


def _cores() -> int:
    """CPUs this process may run on (its affinity where the OS says, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class IngestSettings(BaseModel):
    """How `twostage ingest` reads, batches and reports."""

    batch_tokens: int | None = Field(None, ge=64, description="embedder token budget (None: embedder's)")
    lookup_docs: int = Field(256, ge=1, description="documents whose stored state is read in one call")
    queue_batches: int = Field(4, ge=1, le=64, description="batches in flight between the pipeline stages")
    max_document_chars: int = Field(5_000_000, ge=1000, description="larger documents are reported, skipped")
    progress_interval_s: float = Field(5.0, gt=0, description="seconds between progress lines (no tty)")
    workers: int = Field(
        default_factory=_cores, ge=1, le=256,
        description="processes extracting documents (PDF, Word, HTML) from a folder (default: the cores)",
    )  # fmt: skip
    optimize_after: int = Field(
        5000, ge=0, description="optimise (rebuild HNSW) once this many points were written since the last "
        "time; smaller jobs stay in the appendable segment, searched exactly, so searches are not held up",
    )  # fmt: skip


class NumericsSettings(BaseModel):
    """How far a lower-precision path may stray from fp32 (measured per model, `numerics.py`)."""

    embedder_min_cosine: float = Field(
        0.999, gt=0, le=1, description="smallest cosine similarity of a probe vector with its fp32 one; also "
        "what a collection built with another numeric path needs of this one's probe vectors",
    )  # fmt: skip
    reranker_max_delta: float = Field(
        0.01, ge=0, le=1, description="largest change of a probe score (a probability) from fp32"
    )
    strict: bool = Field(
        False, description="refuse an explicit bfloat16/float16 on a CPU without native bf16 (else: float32 "
        "with one log line)",
    )  # fmt: skip
    int8_engine: Literal["auto", "fbgemm", "onednn", "onednn-fused"] = Field(
        "auto", description="whose int8 kernels quantize=int8 runs; onednn-fused: oneDNN's products on "
        "inputs quantized by a compiled kernel, bf16 between them (needs a C++ compiler); auto: "
        "onednn-fused where the CPU has AMX-INT8 (without a compiler: oneDNN's eager kernels for a "
        "reranker that packs its pairs), torch's default (fbgemm) elsewhere",
    )  # fmt: skip


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
    rerank_k: int | None = Field(
        5, ge=1, description="recalled chunks /v1/search reranks, the rest follow in recall order (null: all "
        "top_k); a request may say. 5: measured by bench/rerank_depth.py (docs/benchmarks.md)",
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
    rerank: bool | Literal["auto"] = Field(
        "auto", description="when a search request does not say: true, false, or auto (rerank only "
        "with a reranker trusted for the deployment: measured better than recall, or trained to rank)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_request_fits_the_queue(self) -> "ApiSettings":
        if self.max_pending < self.max_client_batch:
            raise ValueError(
                f"api.max_pending ({self.max_pending}) must be at least api.max_client_batch "
                f"({self.max_client_batch}), or the largest request could never be admitted"
            )
        return self


class RetrainSettings(BaseModel):
    """`twostage retrain`: how candidates are trained and what it takes to promote one."""

    gate_metric: str = Field("nDCG@10", description="per-query measure the gate's paired tests compare")
    min_gain: float = Field(0.005, ge=0, description="a promoted model gains at least this much")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the gate's paired tests")
    min_dev_queries: int = Field(30, ge=1, description="fewer dev queries than this: nothing is promoted")
    tolerance: float = Field(0.02, ge=0, description="how far the verify step's index metrics may drop")
    dev_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share of --pairs without --dev")
    negatives: int = Field(3, ge=1, description="mined hard negatives per pair")
    top_k: int = Field(20, ge=1, description="dense candidates the reranker sees in evaluation")
    max_distractors: int = Field(20000, ge=0, description="indexed chunks added to the evaluation corpus")
    embedder_epochs: float = Field(1.0, gt=0)
    embedder_batch_size: int = Field(32, ge=2)
    embedder_lr: float = Field(1e-4, gt=0)
    reranker_epochs: float = Field(1.0, gt=0)
    reranker_batch_size: int = Field(16, ge=1)
    reranker_lr: float = Field(1e-4, gt=0)
    lora: bool = Field(True, description="LoRA (merged after training); False: full fine-tuning")
    mask_false_negatives: bool = Field(
        False, description="embedder: leave out in-batch negatives scored above the positive (GIST)"
    )
    eval_steps: int = Field(50, ge=1)
    reranker_max_length: int = Field(1024, ge=64, description="prompt tokens in reranker training")
    canary_events: int = Field(
        1000, ge=1, description="--canary: positive feedback events on canary-period searches before deciding"
    )
    canary_seconds: float = Field(7 * 86400.0, gt=0, description="--canary: decide after this long at most")
    canary_check_s: float = Field(10.0, gt=0, description="how often a service checks its canary's budget")


class CalibrationSettings(BaseModel):
    """Calibrated relevance (`retrieval.search.calibration`): what a fit judges and needs."""

    depth: int = Field(10, ge=1, le=100, description="hits per judged query labelled for the fit")
    min_judgements: int = Field(
        200, ge=20, description="judged hits a fit needs; fewer is refused (retrain keeps the record "
        "uncalibrated and says so)",
    )  # fmt: skip


class FeedbackSettings(BaseModel):
    """The search log and feedback events (`retrieval.traffic`): what is kept, how long, how fast."""

    search_log: bool = Field(
        True, description="log each search (query, instruction, filter, the hits shown, the deployment) "
        "under DATA_DIR/traffic.sqlite3; off: feedback is still taken for search ids of the retention window",
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


SYNTHESIS_PROMPT = (
    "Here is a passage from a document collection:\n\n{passage}\n\n"
    "Write one question a user could type into a search box that this passage answers. "
    "Reply with the question only."
)


class SynthesisSettings(BaseModel):
    """`twostage pairs synthesize`: queries an LLM writes for chunks, kept by a round trip."""

    prompt: str = Field(
        SYNTHESIS_PROMPT, min_length=10, description="the user message; {passage} is replaced by the chunk's "
        "text (its chat markers escaped)",
    )  # fmt: skip
    instruction: str | None = Field(
        None, min_length=1, description="the task instruction recorded with each pair and used by the round "
        "trip's search (default: embedder.instruction)",
    )  # fmt: skip
    top_k: int = Field(10, ge=1, le=1000, description="a query is kept when its chunk is in this many hits")
    max_passage_chars: int = Field(2000, ge=100, description="a longer chunk is cut for the prompt")
    max_new_tokens: int = Field(64, ge=8, le=1024)
    temperature: float = Field(0.7, ge=0, le=2)
    batch: int = Field(8, ge=1, le=256, description="chunks per generation call (--llm local)")
    llm: RemoteSettings = Field(
        default_factory=RemoteSettings, description="retries, timeout and key for --llm URL (url: the flag)"
    )


class Settings(BaseSettings):
    """The root of the settings tree."""

    model_config = SettingsConfigDict(
        env_prefix="TWOSTAGE_", env_nested_delimiter="__", extra="ignore", env_parse_none_str="null"
    )

    data_dir: Path = Field(Path(".twostage/data"), description="indexes and registry")
    cache_dir: Path = Field(Path(".twostage/cache"), description="converted models, fingerprints")
    collection: str = Field(
        "docs", description="collection (alias) searched and ingested into; data in NAME__vN"
    )
    device: DeviceName = Field("auto", description="auto: CUDA when present, else CPU")
    dtype: DtypeName = Field(
        "auto", description="auto: bfloat16 on CUDA; on a CPU with native bf16 (AVX512_BF16, AMX, Arm BF16) "
        "bfloat16 for each model measured within numerics' tolerance of float32; float32 elsewhere",
    )  # fmt: skip
    numerics: NumericsSettings = Field(default_factory=NumericsSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    reranker: RerankerSettings = Field(default_factory=RerankerSettings)
    chunker: ChunkerSettings = Field(default_factory=ChunkerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    recall: RecallSettings = Field(default_factory=RecallSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then `saved_settings_file()` (what quickstart chose)."""
        saved = DotEnvSettingsSource(settings_cls, env_file=saved_settings_file())
        return init_settings, env_settings, saved, file_secret_settings


def saved_settings_file() -> Path:
    """`DATA_DIR/settings.env`: choices `twostage quickstart` made (models it fell back to), in
    the environment's own `TWOSTAGE_*` syntax, so every later command on that data directory
    uses the models that built its index. Environment variables override it."""
    return Path(os.environ.get("TWOSTAGE_DATA_DIR", ".twostage/data")) / "settings.env"
