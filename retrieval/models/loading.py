"""Where models are made: `load_embedder` and `load_reranker` (the only places that pick a family
and import its implementation), over one load pipeline for a local model, whichever role: find
the weights, pick the device and the dtype, load the family's class on its numeric path (measured
against fp32 where `auto` picked bf16, or int8). The Protocol modules (`embedder.py`,
`reranker.py`) import no implementation; the implementations import them."""

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import torch

from twostage.retrieval.models.allocator import keep_freed_memory
from twostage.retrieval.models.devices import resolve_device
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.fingerprint import PROBES
from twostage.retrieval.models.numerics import (
    choose_dtype,
    embedder_deviation,
    load_on_path,
    reranker_deviation,
)
from twostage.retrieval.models.reranker import Reranker, probe_scores
from twostage.retrieval.models.settings import EmbedderSettings, ModelSettings, RerankerSettings
from twostage.retrieval.models.source import ModelSource, model_identity, resolve_model

if TYPE_CHECKING:
    from twostage.retrieval.models.remote import RemoteMetrics

M = TypeVar("M")
# a model's family and its class's `load(source, cfg, *, device, dtype, cache_dir)`
FamilyLoader = tuple[str, Callable[..., M]]


def load_local(
    settings: ModelSettings,
    role: Literal["embedder", "reranker"],
    cfg: EmbedderSettings | RerankerSettings,
    family: Callable[[ModelSource], FamilyLoader[M]],
    *,
    probe: Callable[[M], np.ndarray],
    deviation: Callable[[np.ndarray, np.ndarray], float],
    tolerance: float,
) -> M:
    """`cfg.model` loaded in this process on its numeric path (`numerics.load_on_path`)."""
    source = resolve_model(cfg.model, cache_dir=settings.cache_dir, revision=cfg.revision)
    device = resolve_device(settings.device)
    if device.type == "cpu":
        keep_freed_memory()  # activations' pages stay mapped between passes (allocator)
    name, load_class = family(source)

    def load(dtype: torch.dtype) -> M:
        return load_class(source, cfg, device=device, dtype=dtype, cache_dir=settings.cache_dir)

    return load_on_path(
        load, role=role, family=name, quantize=cfg.quantize,
        choice=choose_dtype(settings.dtype, device, settings.numerics.strict), probe=probe,
        deviation=deviation, tolerance=tolerance, model_id=model_identity(source, settings.cache_dir),
        device=device, cache_dir=settings.cache_dir, engine=settings.numerics.int8_engine,
    )  # fmt: skip


def detect_embedder_family(source: ModelSource) -> str:
    """`last-token` for Qwen-style decoder embedders, else `sentence-transformers`."""
    pooling = source.path / "1_Pooling" / "config.json"
    if pooling.exists() and json.loads(pooling.read_text()).get("pooling_mode_lasttoken"):
        return "last-token"
    config = json.loads((source.path / "config.json").read_text())
    return "last-token" if config.get("model_type") in {"qwen3", "qwen2"} else "sentence-transformers"


def load_embedder(settings: ModelSettings, remote_metrics: "RemoteMetrics | None" = None) -> Embedder:
    """Resolve, load and warm the configured embedder (the only place that picks the family)."""
    cfg = settings.embedder
    if cfg.backend == "remote":
        from twostage.retrieval.models.remote_embedder import RemoteEmbedder

        return RemoteEmbedder(cfg, remote_metrics)

    def family(source: ModelSource) -> "FamilyLoader[Embedder]":
        name = detect_embedder_family(source) if cfg.family == "auto" else cfg.family
        if name == "last-token":
            from twostage.retrieval.models.last_token_embedder import LastTokenEmbedder

            return name, LastTokenEmbedder.load
        from twostage.retrieval.models.st_embedder import SentenceTransformerEmbedder

        return name, SentenceTransformerEmbedder.load

    return load_local(
        settings, "embedder", cfg, family, probe=lambda e: e.embed_documents(list(PROBES)),
        deviation=embedder_deviation, tolerance=1.0 - settings.numerics.embedder_min_cosine,
    )  # fmt: skip


def detect_reranker_family(source: ModelSource) -> str:
    """`yes-no` for causal LMs, `cross-encoder` for sequence-classification models."""
    config = json.loads((source.path / "config.json").read_text())
    architectures = config.get("architectures") or []
    return "yes-no" if any(a.endswith("ForCausalLM") for a in architectures) else "cross-encoder"


def reranker_family(source: ModelSource, configured: str = "auto") -> str:
    """The family a reranker is served and trained as: `configured` unless it is `auto`."""
    return detect_reranker_family(source) if configured == "auto" else configured


def load_reranker(settings: ModelSettings, remote_metrics: "RemoteMetrics | None" = None) -> Reranker:
    """Resolve, load and warm the configured reranker (the only place that picks the family)."""
    cfg = settings.reranker
    if cfg.backend == "remote":
        from twostage.retrieval.models.remote_reranker import RemoteReranker

        return RemoteReranker(cfg, remote_metrics)

    def family(source: ModelSource) -> "FamilyLoader[Reranker]":
        name = reranker_family(source, cfg.family)
        if name == "yes-no":
            from twostage.retrieval.models.yes_no_reranker import YesNoReranker

            return name, YesNoReranker.load
        from twostage.retrieval.models.cross_encoder_reranker import CrossEncoderReranker

        return name, CrossEncoderReranker.load

    return load_local(
        settings, "reranker", cfg, family, probe=probe_scores, deviation=reranker_deviation,
        tolerance=settings.numerics.reranker_max_delta,
    )  # fmt: skip
