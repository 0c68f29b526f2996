"""Loading a model on its numeric path, measured against fp32 on fixed probes where `auto` picked
bf16, with the verdict cached by the model, torch version and CPU feature."""

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

import twostage.retrieval.models.numerics.cpu as cpu
from twostage.retrieval.models.numerics.dtype import DtypeChoice, dtype_name
from twostage.retrieval.models.numerics.int8 import auto_int8_engine, int8_advice, quantize_int8, require_int8

log = logging.getLogger(__name__)

M = TypeVar("M")

# what the rerankers' probes score: varied lengths, scripts and one obviously relevant document
RERANK_PROBES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "how do I install a package on Debian?",
        (
            "apt install NAME installs a package and its dependencies from the configured archives.",
            "Chess engine with a graphical board, playing strength levels and opening books.",
            "数据 ünïcödé 12345 <tag> & ☃",
        ),
    ),
    ("what is BM25?", ("BM25 ranks documents by term frequency and inverse document frequency.", "A clock.")),
)


def embedder_deviation(reference: np.ndarray, other: np.ndarray) -> float:
    """1 - the smallest cosine similarity between matching probe vectors."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    cosines = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(1.0 - cosines.min())


def reranker_deviation(reference: np.ndarray, other: np.ndarray) -> float:
    """The largest change of a probe score (probabilities)."""
    return float(np.abs(np.asarray(reference, np.float64) - np.asarray(other, np.float64)).max())


def load_on_path(
    load: Callable[[torch.dtype], M],
    *,
    role: str,
    family: str,
    quantize: str,
    choice: DtypeChoice,
    probe: Callable[[M], np.ndarray],
    deviation: Callable[[np.ndarray, np.ndarray], float],
    tolerance: float,
    model_id: str,
    device: torch.device,
    cache_dir: Path,
    engine: str = "auto",
) -> M:
    """The model on its numeric path: int8 from fp32 weights (whatever `dtype` says), or the
    chosen dtype, measured against fp32 when `auto` picked bf16 on a CPU. `engine`: whose int8
    kernels run it (`NumericsSettings.int8_engine`)."""
    if quantize == "int8":
        require_int8(role, family, model_id, device)
        advice = int8_advice(role, model_id)
        if advice is not None:
            log.warning("%s", advice)
        model = load(torch.float32)
        # the reranker's down projections in int8 too: measured on its ranking (quantize_int8)
        encoder = model.model  # type: ignore[attr-defined]
        reranker = role == "reranker"
        packed = reranker and bool(getattr(model, "packed", False))  # for `auto` without a compiler
        chosen = auto_int8_engine(packed) if engine == "auto" else engine
        quantize_int8(encoder, calibrate=lambda: probe(model), int8_down=reranker, engine=chosen)
        return model
    return load_measured(load, choice, probe, deviation, tolerance, model_id, cache_dir)[0]


def load_measured(
    load: Callable[[torch.dtype], M],
    choice: DtypeChoice,
    probe: Callable[[M], np.ndarray],
    deviation: Callable[[np.ndarray, np.ndarray], float],
    tolerance: float,
    model_id: str,
    cache_dir: Path,
) -> tuple[M, float | None]:
    """The model in `choice.dtype`, or in fp32 when the choice is measured and strays too far.

    Returns the model and the measured deviation (None when nothing was measured). The first
    load of a model measures (loaded in fp32 and in the candidate dtype, probes compared); the
    verdict is kept in `cache_dir/numerics/`, so later loads load one dtype straight away.
    """
    if not choice.measured:
        return load(choice.dtype), None
    verdict_file = _verdict_file(cache_dir, model_id, choice.dtype)
    if verdict_file.exists():
        measured = float(json.loads(verdict_file.read_text())["deviation"])
        model = load(choice.dtype if measured <= tolerance else torch.float32)
    else:
        reference_model = load(torch.float32)
        reference = probe(reference_model)
        candidate = load(choice.dtype)
        measured = deviation(reference, probe(candidate))
        verdict_file.parent.mkdir(parents=True, exist_ok=True)
        verdict_file.write_text(json.dumps({"model": model_id, "dtype": dtype_name(choice.dtype),
                                            "deviation": measured, "tolerance": tolerance}))  # fmt: skip
        model = candidate if measured <= tolerance else reference_model
        del reference_model, candidate
    name = dtype_name(choice.dtype)
    if measured <= tolerance:
        log.info("%s in %s (%s): deviation from float32 %.2g, tolerance %.2g",
                 model_id, name, choice.why, measured, tolerance)  # fmt: skip
    else:
        log.warning("%s strays %.2g from float32 in %s (tolerance %.2g): running it in float32",
                    model_id, measured, name, tolerance)  # fmt: skip
    return model, measured


def _verdict_file(cache_dir: Path, model_id: str, dtype: torch.dtype) -> Path:
    # the CPU's bf16 feature: with AMX `bf16_matmuls` computes more in bf16 ("+attention": verdicts
    # from before it did measured another path); a reranker on a CPU now packs its documents
    # (`packed_attention`), and so does a BERT cross-encoder its pairs: other products' shapes,
    # other bf16 rounding
    path = "matmuls+attention|packed-rows|packed-pairs"
    key = f"{model_id}|{dtype_name(dtype)}|torch {torch.__version__}|{cpu.native_bf16()}|{path}"
    return cache_dir / "numerics" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
