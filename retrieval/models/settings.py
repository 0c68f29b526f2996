"""The models layer's settings: which embedder and reranker, local or remote, and their numerics."""

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from twostage.retrieval.core.settings import CoreSettings
from twostage.retrieval.models.prompts import DEFAULT_TASK


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


class NumericsSettings(BaseModel):
    """How far a lower-precision path may stray from fp32 (measured per model by
    `retrieval/models/numerics/measured.py`)."""

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


class ModelSettings(CoreSettings):
    """What loading and running the models reads."""

    numerics: NumericsSettings = Field(default_factory=NumericsSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    reranker: RerankerSettings = Field(default_factory=RerankerSettings)
