"""The one load pipeline of a local model, whichever role: find the weights, pick the device and
the dtype, load the family's class on its numeric path (measured against fp32 where `auto` picked
bf16, or int8). `load_embedder` and `load_reranker` say only what differs: the family, the probes
and the tolerance."""

from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
import torch

from twostage.retrieval.models.allocator import keep_freed_memory
from twostage.retrieval.models.devices import resolve_device
from twostage.retrieval.models.numerics import choose_dtype, load_on_path
from twostage.retrieval.models.source import ModelSource, model_identity, resolve_model
from twostage.retrieval.settings import EmbedderSettings, RerankerSettings, Settings

M = TypeVar("M")
# a model's family and its class's `load(source, cfg, *, device, dtype, cache_dir)`
FamilyLoader = tuple[str, Callable[..., M]]


def load_local(
    settings: Settings,
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
