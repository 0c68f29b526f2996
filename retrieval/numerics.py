"""Numeric paths (dtype, int8) and the measurement that lets `dtype=auto` pick bf16 on a CPU.

bf16 halves memory traffic and, on CPUs with native bf16 dot products (x86 AVX512_BF16 or
AMX, Arm's BF16 extension), runs matrix products at about twice fp32's rate. Without them
oneDNN emulates bf16 through fp32 and it only loses precision, so `auto` never picks it there.
Where it is native, `auto` still keeps bf16 only for a model whose outputs stay close to fp32:
the first load measures it on fixed probes (both dtypes loaded once, compared, the verdict
cached by the model's content hash and torch version), because the deviation is a property of
the weights (their range, the depth of the network), not of the hardware alone.

Tolerances (`NumericsSettings`, documented in the README): embedder probe vectors keep a cosine
similarity of at least `embedder_min_cosine` (0.999) with fp32; reranker probe scores, as
probabilities, move by at most `reranker_max_delta` (0.01). Measured on an AMD EPYC
(avx512_bf16): all-MiniLM-L6-v2 0.99994 and a MiniLM cross-encoder 0.0008 keep bf16, and so does
SmolLM2-135M as a yes/no reranker through `bf16_matmuls` (0.0026; wholly in bf16 it moved 0.0118;
0.0051 on an Intel Xeon with AMX, where `bf16_matmuls` also puts attention and SwiGLU in bf16, and
0.0093 there once the reranker packs its documents into rows: other product shapes, other roundings).
"""

import contextlib
import functools
import hashlib
import json
import logging
import platform
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from twostage.retrieval.errors import ModelLoadError
from twostage.retrieval.fused_int8 import (
    FUSED_ENGINE,
    FusedInt8Linear,
    FusedInt8Unavailable,
    fuse_int8,
    fused_quantizer,
    smoothing_scale,
)
from twostage.retrieval.packed_attention import register_packed

log = logging.getLogger(__name__)

M = TypeVar("M")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


INT8_PATH = "int8-dynamic"  # what `numeric_path` calls a model with torch's dynamic int8 layers
INT8_FUSED_PATH = "int8-fused"  # ... and one with `FusedInt8Linear` layers in bf16 (other vectors)


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


INT8_FAMILIES = {"embedder": "sentence-transformers", "reranker": "cross-encoder"}


def require_int8(role: str, family: str, model: str, device: torch.device) -> None:
    """int8 is for the small encoders on a CPU; anything else is one clear error."""
    if family != INT8_FAMILIES[role]:
        raise ModelLoadError(
            f"quantize=int8 is for {INT8_FAMILIES[role]} {role}s (small encoders); {model} is a {family} "
            f"{role}, which is not quantized here: use dtype=bfloat16 (or quantize=none)"
        )
    if device.type != "cpu":
        raise ModelLoadError(
            f"quantize=int8 runs on the CPU only (device is {device}); use dtype=bfloat16 there"
        )


def int8_advice(role: str, model: str) -> str | None:
    """One line for a user who asked for int8 on a CPU with AMX, where bf16 is as fast and closer
    to fp32.

    Measured there (Intel Xeon with AMX, 2 threads; README, Benchmarks), int8 on the fused path
    (`fused_int8`, 09f4bbf): MiniLM ingest (`bench/ingest.py --variants fp32,bf16,int8`) bf16
    2.80x fp32 with top-10 overlap 0.987, int8 2.92x with 0.963; the MiniLM cross-encoder
    (`bench/rerank_throughput.py --variants fp32,bf16,int8`) bf16 2.25x with scores within 0.021
    and nDCG@10 unchanged, int8 2.06x with scores within 0.33. On torch's eager int8 kernels (no
    C++ compiler for `torch.compile`) int8 ran 1.5-1.6x (cadd4f4, e42f7b9).
    """
    if native_bf16() != "amx_bf16":
        return None
    return (
        f"quantize=int8 for the {role} {model} on a CPU with AMX: bf16 is as fast here and closer to fp32 "
        "(MiniLM measured 2.3-2.8x fp32 in bf16, 2.1-2.9x in int8); set dtype=bfloat16 and quantize=none"
    )


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def int8_full_range() -> bool:
    """Whether int8 activations may use all 8 bits: only where the CPU multiplies u8 x s8 with
    32-bit accumulation (x86 VNNI or AMX-INT8). Elsewhere fbgemm's AVX2 kernel sums pairs of
    products in saturating 16-bit lanes (255 * 127 * 2 > 32767), which is why torch's dynamic
    Linear quantizes activations to 7 bits (`reduce_range=True`) everywhere by default."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_engine() -> str | None:
    """The quantized engine for torch's eager int8 kernels where the CPU has AMX-INT8: oneDNN
    (fbgemm's kernels do not use it), else None (torch's default). `auto` runs the fused path
    there instead (`auto_int8_engine`), and these kernels only where `torch.compile` fails.

    oneDNN builds a kernel at each new row count (about 1 ms per Linear shape), so it pays only
    where rows are few and large: a cross-encoder's packed rows (`packs_pairs`). Measured on an
    Intel Xeon with AMX (`bench/rerank_throughput.py --variants fp32,bf16,int8`, MiniLM-L6
    cross-encoder, 100 debian-ir dev queries x hybrid top 10): packed rows with oneDNN ran int8 at
    1.51x fp32 (cadd4f4; fbgemm's 1.26x, 8e74708); padded batches with oneDNN at 0.95x, below
    fbgemm's 1.10-1.14x there (3ad84e6).
    """
    if "amx_int8" in _cpu_flags() and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return None


_ENGINE_LOCK = threading.Lock()  # torch's quantized engine is process-wide: one packing at a time


@contextlib.contextmanager
def _packing_engine(engine: str | None) -> Iterator[None]:
    """torch's quantized engine set to `engine` while layers are packed: packed weights keep the
    engine they were packed for, so only the packing needs it."""
    supported = torch.backends.quantized.supported_engines
    if engine is not None and engine not in supported:
        raise ModelLoadError(
            f"int8 engine {engine!r} is not in this torch build (it has {', '.join(supported)})"
        )
    with _ENGINE_LOCK:
        previous = torch.backends.quantized.engine
        if engine is not None:
            torch.backends.quantized.engine = engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


@functools.cache
def _full_range_linear() -> type[torch.nn.Module]:
    """torch's dynamic int8 Linear, with 8-bit activations (`reduce_range=False`)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeDynamicLinear(DynamicLinear):
        """Dynamic int8 Linear whose activations keep all 8 bits (see `int8_full_range`)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = self._packed_params._packed_params
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)

    return FullRangeDynamicLinear


HEAD_OUTPUTS = 64  # a Linear with fewer outputs is a head and stays in fp32


class SmoothedLinear(torch.nn.Module):
    """A dynamic int8 Linear behind SmoothQuant's per-channel scales (Xiao et al., 2023).

    A few input channels of a transformer's activations run tens of times larger than the
    rest, and one int8 scale per call then spends its levels on them. Dividing each input
    channel by `s = max|x|^a / max|W|^(1-a)` and multiplying the weight's columns by the same
    `s` leaves the product unchanged and moves that range into the per-channel weights.
    BERT-style models normalize after the residual sum, so the scale cannot be folded into a
    LayerNorm: it is one elementwise multiply per call, small beside the GEMM.
    """

    inverse_scale: torch.Tensor

    def __init__(
        self, linear: torch.nn.Linear, activation_max: torch.Tensor, quantized: type, out_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        scale = smoothing_scale(linear.weight, activation_max)
        smoothed = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            smoothed.weight.copy_(linear.weight * scale[None, :])
            if linear.bias is not None:
                smoothed.bias.copy_(linear.bias)
        smoothed.qconfig = _per_channel_qconfig()  # type: ignore[assignment]
        self.register_buffer("inverse_scale", (1.0 / scale).to(torch.float32))
        self.linear = quantized.from_float(smoothed)  # type: ignore[attr-defined]
        self.engine = torch.backends.quantized.engine  # whose kernels the packed weights run on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inverse_scale).to(self.out_dtype)


class Bf16Linear(torch.nn.Module):
    """A Linear run in bf16 and answered in the model's dtype: for the layers int8 cannot hold, and
    for every decoder Linear of a causal LM on a CPU (`bf16_matmuls`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.out_dtype = linear.weight.dtype
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(self.out_dtype)


class Bf16Output(torch.nn.Module):
    """A module whose output is rounded to bf16 once, where only `Bf16Linear` layers read it."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).to(torch.bfloat16)


# Pre-norm decoder layers whose two RMSNorm outputs go only to Linear layers (q/k/v, then gate/up),
# the residual being taken before each norm, and whose value projection goes only to attention:
# read in transformers' Llama and Qwen3 modeling code.
PRE_NORM_LAYERS = frozenset({"LlamaDecoderLayer", "Qwen3DecoderLayer"})
PRE_NORMS = ("input_layernorm", "post_attention_layernorm")
BF16_ATTENTION = "twostage_bf16_sdpa"  # the attention implementation `bf16_matmuls` registers and sets


def bf16_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' SDPA attention on bf16 query, key and value: torch's CPU flash kernel then runs
    its two products in bf16 (AMX where the CPU has it) and keeps the softmax in fp32. It answers
    in bf16, which only the output projection (a `Bf16Linear`) reads. The mask is SDPA's own
    (`sdpa_mask`, boolean), so it needs no rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bf16 = torch.bfloat16
    out: tuple[torch.Tensor, torch.Tensor | None] = sdpa_attention_forward(
        module, query.to(bf16), key.to(bf16), value.to(bf16), attention_mask, **kwargs
    )
    return out


@functools.cache
def _bf16_attention() -> str:
    """`bf16_sdpa`, registered once with transformers under `BF16_ATTENTION`, segment-aware for
    packed rows (`packed_attention`), with SDPA's masks."""
    return register_packed(BF16_ATTENTION, bf16_sdpa)


def _matmuls_only(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and device.type == "cpu"


def causal_lm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a causal LM loads in: fp32 for bf16 on a CPU, where `bf16_matmuls` then puts its
    matrix products (and only those) in bf16."""
    return torch.float32 if _matmuls_only(dtype, device) else dtype


def bf16_matmuls(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """bf16 on a CPU for a causal LM (yes/no reranker, last-token embedder), in place: every
    Linear of the decoder runs in bf16 (`Bf16Linear`: bf16 weights, its input rounded to bf16,
    fp32 out), while the residual stream, RMSNorm and the rotary embedding stay in fp32. Where the
    CPU has AMX, attention takes bf16 inputs too (`bf16_sdpa`) and SwiGLU's SiLU and product run
    on the bf16 outputs of gate and up.

    Why not the whole model in bf16, as on CUDA: a bf16 residual stream rounds at each of the 30
    layers' two sums. SmolLM2-135M as a yes/no reranker on 100 debian-ir dev queries x hybrid top 10
    (README, Numeric paths): the whole model in bf16 ran 1.68x fp32 (one pass, AMD EPYC) but moved
    nDCG@10 by -0.0095; this path keeps it within 0.005. The embedding table stays fp32 (a lookup,
    not a product): for Qwen3-0.6B's 151,669 x 1,024 table, 0.3 GB more than the whole model in bf16.
    On an AMD EPYC with avx512_bf16 (no AMX) bf16 paid only in the matrix products (1.93x fp32 as
    `Bf16Linear`, `bench/matmul_ceiling.py`; the flash-attention kernel no faster in bf16) and this
    path ran 1.57x fp32 (3 rounds). On an Intel Xeon with AMX the products run 3.94x fp32 and the
    rest dominates: each RMSNorm's output is rounded to bf16 once (`Bf16Output`) instead of once per
    Linear that reads it (q, k, v; gate, up), the same bf16 inputs, so the same scores (1.51x ->
    1.68x fp32); then bf16 attention and SwiGLU, with the value projection answering in bf16
    (attention rounds the values to bf16 anyway: the same scores, two casts fewer), 1.81-1.91x fp32
    with nDCG@10 -0.0010 (two 3-round runs; probe scores move 0.0051 against 0.0073 without them);
    with the yes/no reranker's packed rows (`packed_attention`), whose larger products run faster
    in bf16, 2.11x fp32 (7ce4b7f), nDCG@10 +0.0028.
    A no-op unless `dtype` is bf16 and `device` a CPU (`causal_lm_dtype` loaded it in fp32).
    """
    if not _matmuls_only(dtype, device):
        return
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        _replace(model, name, Bf16Linear(linear))
    amx = native_bf16() == "amx_bf16"  # where bf16 attention and SwiGLU were measured to pay
    config = getattr(model, "config", None)
    if amx and getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(_bf16_attention())  # type: ignore[operator]
    bf16_attention = getattr(config, "_attn_implementation", None) == BF16_ATTENTION
    for layer in [m for m in model.modules() if type(m).__name__ in PRE_NORM_LAYERS]:
        for norm in PRE_NORMS:
            setattr(layer, norm, Bf16Output(getattr(layer, norm)))
        if amx:  # gate and up answer in bf16 (the product rounded them so already): SiLU and the
            # product run on half the bytes, and the down projection reads them uncast
            _answer_in_bf16(layer, "mlp.gate_proj", "mlp.up_proj")
        if bf16_attention:  # the values are only read by attention, in bf16: the same values, two casts fewer
            _answer_in_bf16(layer, "self_attn.v_proj")


def _answer_in_bf16(layer: torch.nn.Module, *names: str) -> None:
    for name in names:
        projection = layer.get_submodule(name)
        if isinstance(projection, Bf16Linear):
            projection.out_dtype = torch.bfloat16


def _per_channel_qconfig() -> object:
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return per_channel_dynamic_qconfig


def _activation_maxima(module: torch.nn.Module, calibrate: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Each Linear's largest |input| per channel while `calibrate` runs the model."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], object], None]:
        def hook(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], __: object) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x

        return hook

    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(record(n)) for n, m in linears]
    try:
        with torch.no_grad():
            calibrate()
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def quantize_int8(
    module: torch.nn.Module,
    calibrate: Callable[[], object] | None = None,
    *,
    int8_down: bool = False,
    engine: str | None = None,
) -> None:
    """int8 for a small encoder's Linear layers, in place: int8 weights per output channel,
    activations quantized per call (fbgemm/oneDNN int8 GEMMs, VNNI where the CPU has it).

    With `calibrate` (a call that runs the model on a few texts: the load's probes), each int8
    layer gets SmoothQuant scales (`SmoothedLinear`), and the down projections (a Linear with
    more inputs than outputs: BERT's FFN output, whose inputs come out of a GELU) run in bf16
    where the CPU has native bf16 (fp32 elsewhere) instead of int8; the FFN's intermediate
    layer (the `dense` of a module whose class ends in `Intermediate`, as in every BERT-family
    model in transformers) then answers in bf16, so its GELU runs in bf16 (4x faster than fp32
    here) on what the bf16 down projection reads anyway. Without `calibrate` every Linear
    becomes a plain dynamic int8 layer. Heads (fewer than `HEAD_OUTPUTS` outputs, such as a
    cross-encoder's classifier) stay in fp32 either way: they cost nothing and carry the score.
    `int8_down` (the cross-encoder's path) puts the down projections in int8 too, with their
    own SmoothQuant scales: a reranker is judged by its ranking, and on 100 debian-ir dev
    queries x hybrid top 10 that path kept nDCG@10 (+0.0018 vs fp32, p = 0.66; scores move up
    to 0.13) at 1.78x fp32, against 1.61x with them in bf16 (`bench/rerank_throughput.py
    --variants fp32,int8 --rounds 7`). An embedder's vectors fill an index, whose top-10 overlap
    with the fp32-built one needs them in bf16 (README). `engine` is the quantized engine the
    layers are packed for (`int8_engine`; None: torch's default, fbgemm on x86), or
    `onednn-fused`: the model in bf16 with oneDNN's int8 products on inputs quantized by one
    compiled kernel (`fused_int8.fuse_int8`; needs `calibrate`), the default on a CPU with
    AMX-INT8 (`auto_int8_engine`).

    Chosen by measurement (README, Numeric paths), MiniLM over 256 debian-ir documents, worst /
    mean cosine with fp32: per-tensor weights 0.89; per-channel weights with torch's 7-bit
    activations 0.963 / 0.981; with 8-bit activations on VNNI (`int8_full_range`) 0.988 / 0.994
    at 2.0-2.2x fp32; SmoothQuant alone 0.977 (the FFN output is what int8 loses); FFN output
    in bf16 alone 0.9945; both, which is this path, 0.9988 / 0.9994 at 1.7-1.9x. Per-token
    activation scales through `torch._int_mm` reached 0.997 but ran at 1.47x. torchao 0.18's
    int8 dynamic config ran at 0.56x in eager mode, and sentence-transformers' ONNX backend
    needs optimum-onnx, which requires transformers < 4.58. torch.ao.quantization is
    deprecated upstream but present in the pinned torch; its warning is silenced here and the
    path is covered by tests, so a torch upgrade that drops it fails CI.
    """
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if engine == FUSED_ENGINE:
        if calibrate is None:
            raise ModelLoadError(f"int8 engine {FUSED_ENGINE} needs calibration (the load's probes)")
        try:
            fuse_int8(
                module, _activation_maxima(module, calibrate), int8_down=int8_down, head_outputs=HEAD_OUTPUTS
            )
        except FusedInt8Unavailable as exc:
            raise ModelLoadError(f"int8 engine {FUSED_ENGINE}: {exc}") from exc
        return
    quantized = _full_range_linear() if int8_full_range() else DynamicLinear
    maxima = _activation_maxima(module, calibrate) if calibrate is not None else {}
    bf16 = native_bf16() is not None
    ffn_up = {f"{n}.dense" for n, m in module.named_modules() if type(m).__name__.endswith("Intermediate")}
    with warnings.catch_warnings(), _packing_engine(engine):
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        for name, linear in [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]:
            replacement: torch.nn.Module
            if linear.out_features < HEAD_OUTPUTS:
                continue  # a head (a cross-encoder's classifier): no time to save, and it carries the score
            if calibrate is not None and linear.in_features > linear.out_features and not int8_down:
                replacement = Bf16Linear(linear) if bf16 else linear
            elif name in maxima:
                out = torch.bfloat16 if bf16 and name in ffn_up else linear.weight.dtype
                replacement = SmoothedLinear(linear, maxima[name], quantized, out)
            else:
                linear.qconfig = _per_channel_qconfig()  # type: ignore[assignment]
                replacement = quantized.from_float(linear)  # type: ignore[attr-defined]
            _replace(module, name, replacement)


def auto_int8_engine(packed: bool) -> str | None:
    """`int8_engine=auto`: on a CPU with AMX-INT8 the fused path (`fused_int8`) where
    `torch.compile` works, else (one warning) oneDNN's eager kernels for a reranker that packs its
    pairs, whose few row counts reuse them (`int8_engine`); torch's default (fbgemm) elsewhere.
    Measured on an Intel Xeon with AMX (README, Benchmarks): see `int8_advice`."""
    if int8_engine() != "onednn":
        return None
    try:
        fused_quantizer()
    except FusedInt8Unavailable as exc:
        log.warning("%s; int8 runs torch's eager kernels, which are slower", exc)
        return "onednn" if packed else None
    return FUSED_ENGINE


def _replace(module: torch.nn.Module, name: str, replacement: torch.nn.Module) -> None:
    if not name:
        raise ModelLoadError("quantize=int8 takes a model, not a bare Linear layer")
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, replacement)


def native_bf16() -> str | None:
    """The CPU feature that makes bf16 matrix products native here, or None.

    torch's own cpuinfo probes (`torch.cpu._is_avx512_bf16_supported`, `_is_amx_tile_supported`;
    private but stable since torch 2.3) on x86; `/proc/cpuinfo`'s `bf16` feature on Arm Linux.
    """
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx_bf16"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    if platform.machine().lower() in {"aarch64", "arm64"}:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        for line in info.splitlines():
            if line.lower().startswith("features") and "bf16" in line.split(":", 1)[1].split():
                return "arm_bf16"
    return None


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype to load, and whether it must first prove itself against fp32 on this model."""

    dtype: torch.dtype
    measured: bool  # `auto` picked bf16 on a CPU: kept only within tolerance
    why: str


def choose_dtype(name: str, device: torch.device, strict: bool = False) -> DtypeChoice:
    """What `dtype` means on `device`.

    auto: bf16 on CUDA that supports it; bf16 on a CPU with native bf16, to be measured; fp32
    elsewhere. An explicit bf16/fp16 on a CPU without native bf16 falls back to fp32 with one
    log line (its emulation is slower than fp32), or is refused when `strict`.
    """
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return DtypeChoice(torch.bfloat16, False, "CUDA with bf16")
            return DtypeChoice(torch.float32, False, "CUDA without bf16")
        feature = native_bf16() if device.type == "cpu" else None
        if feature is not None:
            return DtypeChoice(torch.bfloat16, True, f"CPU with {feature}")
        return DtypeChoice(torch.float32, False, f"{device.type} without native bf16")
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32 and native_bf16() is None:
        why = f"dtype {name} asked for on a CPU without native bf16 (no avx512_bf16, AMX or Arm bf16)"
        if strict:
            raise ModelLoadError(f"{why}; use dtype=auto or float32 (or unset numerics.strict)")
        log.warning("%s: running in float32, which is faster and exact here", why)
        return DtypeChoice(torch.float32, False, why)
    return DtypeChoice(dtype, False, f"dtype {name} asked for")


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
    key = f"{model_id}|{dtype_name(dtype)}|torch {torch.__version__}|{native_bf16()}|{path}"
    return cache_dir / "numerics" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
