"""One settings tree for the whole service (env prefix `TWOSTAGE_`, nested with `__`).

Example: `TWOSTAGE_RERANKER__MODEL=/models/my-reranker TWOSTAGE_DEVICE=cpu twostage ...`.
Later packages (store, API, training) add their sections here rather than keeping their own.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.prompts import DEFAULT_TASK

DeviceName = Literal["auto", "cpu", "cuda", "mps"] | str
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class EmbedderSettings(BaseModel):
    """Which embedding model to run and how to batch it."""

    model: str = Field("Qwen/Qwen3-Embedding-0.6B", description="hub id, local directory or pypi:NAME")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    family: Literal["auto", "last-token", "sentence-transformers"] = Field(
        "auto",
        description="last-token: Qwen3-Embedding semantics; sentence-transformers: the model's own pooling",
    )
    max_length: int = Field(8192, ge=8, le=131072)
    batch_tokens: int = Field(16384, ge=64, description="padded tokens per forward pass")
    dim: int | None = Field(None, ge=8, description="Matryoshka output dimension (None = full)")
    instruction: str = Field(DEFAULT_TASK, min_length=1, description="default task for query prompts")


class RerankerSettings(BaseModel):
    """Which reranker to run and how to batch it."""

    model: str = Field("Qwen/Qwen3-Reranker-0.6B", description="hub id, local directory or pypi:NAME")
    revision: str | None = None
    family: Literal["auto", "yes-no", "cross-encoder"] = Field(
        "auto",
        description="yes-no: causal LM judged by logit(yes)-logit(no); cross-encoder: sentence-transformers",
    )
    max_length: int = Field(8192, ge=64, le=131072)
    batch_tokens: int = Field(16384, ge=64, description="padded tokens per forward pass")
    instruction: str = Field(DEFAULT_TASK, min_length=1, description="default <Instruct> of the prompt")


class Settings(BaseSettings):
    """The root of the settings tree."""

    model_config = SettingsConfigDict(env_prefix="TWOSTAGE_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(Path(".twostage/data"), description="indexes and registry")
    cache_dir: Path = Field(Path(".twostage/cache"), description="converted models, fingerprints")
    device: DeviceName = Field("auto", description="auto: CUDA when present, else CPU")
    dtype: DtypeName = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    reranker: RerankerSettings = Field(default_factory=RerankerSettings)
