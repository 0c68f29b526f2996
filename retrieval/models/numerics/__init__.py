"""Numeric paths (dtype, int8) and the measurement that lets `dtype=auto` pick bf16 on a CPU.

bf16 halves memory traffic and, on CPUs with native bf16 dot products (x86 AVX512_BF16 or
AMX, Arm's BF16 extension), runs matrix products at about twice fp32's rate. Without them
oneDNN emulates bf16 through fp32 and it only loses precision, so `auto` never picks it there.
Where it is native, `auto` still keeps bf16 only for a model whose outputs stay close to fp32:
the first load measures it on fixed probes (both dtypes loaded once, compared, the verdict
cached by the model's content hash and torch version), because the deviation is a property of
the weights (their range, the depth of the network), not of the hardware alone.

Tolerances (`NumericsSettings`, documented in docs/models.md): embedder probe vectors keep a cosine
similarity of at least `embedder_min_cosine` (0.999) with fp32; reranker probe scores, as
probabilities, move by at most `reranker_max_delta` (0.01). Measured on an AMD EPYC
(avx512_bf16): all-MiniLM-L6-v2 0.99994 and a MiniLM cross-encoder 0.0008 keep bf16, and so does
SmolLM2-135M as a yes/no reranker through `bf16_matmuls` (0.0026; wholly in bf16 it moved 0.0118;
0.0051 on an Intel Xeon with AMX, where `bf16_matmuls` also puts attention and SwiGLU in bf16, and
0.0093 there once the reranker packs its documents into rows: other product shapes, other roundings).

The jobs live in one module each: `cpu` (what the CPU offers), `dtype` (what a dtype setting
means there), `bf16` and `int8` (layer surgery), `fused_int8` (the AMX-INT8 route), `measured`
(loading on a path, measured against fp32). This package's names are their public face.
"""

import torch

from twostage.retrieval.models.numerics.bf16 import (
    BF16_ATTENTION,
    PRE_NORMS,
    Bf16Linear,
    Bf16Output,
    bf16_matmuls,
    causal_lm_dtype,
)
from twostage.retrieval.models.numerics.cpu import int8_full_range, native_bf16
from twostage.retrieval.models.numerics.dtype import DtypeChoice, choose_dtype, dtype_name
from twostage.retrieval.models.numerics.fused_int8 import FusedInt8Linear
from twostage.retrieval.models.numerics.int8 import (
    HEAD_OUTPUTS,
    INT8_FUSED_PATH,
    INT8_PATH,
    SmoothedLinear,
    auto_int8_engine,
    int8_advice,
    int8_engine,
    quantize_int8,
)
from twostage.retrieval.models.numerics.measured import (
    RERANK_PROBES,
    embedder_deviation,
    load_measured,
    load_on_path,
    reranker_deviation,
)

__all__ = [
    "BF16_ATTENTION",
    "HEAD_OUTPUTS",
    "INT8_FUSED_PATH",
    "INT8_PATH",
    "PRE_NORMS",
    "RERANK_PROBES",
    "Bf16Linear",
    "Bf16Output",
    "DtypeChoice",
    "SmoothedLinear",
    "auto_int8_engine",
    "bf16_matmuls",
    "causal_lm_dtype",
    "choose_dtype",
    "dtype_name",
    "embedder_deviation",
    "int8_advice",
    "int8_engine",
    "int8_full_range",
    "load_measured",
    "load_on_path",
    "native_bf16",
    "numeric_path",
    "quantize_int8",
    "reranker_deviation",
]


def numeric_path(model: torch.nn.Module) -> str:
    """What computes a loaded model's outputs: `int8-dynamic` when its Linear layers are torch's
    dynamic int8 ones, `int8-fused` when they are `FusedInt8Linear` (bf16 between them), else the
    dtype of its floating-point weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if any(isinstance(module, FusedInt8Linear) for module in model.modules()):
        return INT8_FUSED_PATH
    if any(isinstance(module, DynamicLinear) for module in model.modules()):
        return INT8_PATH
    if any(isinstance(module, Bf16Linear) for module in model.modules()):
        return "bfloat16"  # `bf16_matmuls`: bf16 weights in every matrix product
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return dtype_name(parameter.dtype)
    return "unknown"
