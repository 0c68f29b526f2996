"""int8 matrix products inside a bf16 encoder, for CPUs with AMX-INT8 (`fuse_int8`, through
`numerics.quantize_int8` with engine `onednn-fused`).

Why a second int8 path. torch's dynamic int8 Linear (`quantized::linear_dynamic`) quantizes its
input inside the call, in a pass of its own over fp32 activations, and the rest of the model
stays in fp32. On an Intel Xeon with AMX (2 threads; scratch microbenchmark at 1,740 rows, the
size of a packed cross-encoder row batch) oneDNN's int8 product on an already quantized input
(`onednn::qlinear_pointwise`) ran a 384 x 384 layer in 137 us against 222 us in bf16 and 1,903 us
in fp32, and 384 -> 1,536 in 586 us against 1,084 us in bf16; but quantizing the input in eager
ops (absolute maximum, divide, round, clamp, cast: a pass each) cost 2,216 us, and torch's own
`quantize_per_tensor_dynamic` 409 us. So here:

- the input is quantized by one kernel that `torch.compile` generates (`fused_quantizer`): the
  SmoothQuant multiply, the minimum and maximum, and the rounding to uint8 in two passes over the
  bf16 activations (264 us at that size, and fewer bytes than fp32);
- a self-attention's query, key and value quantize their one input once (`SharedInput`);
- the product is oneDNN's AMX-INT8 kernel, answering in bf16 with the bias added (and BERT's
  GELU applied inside it for the intermediate layer);
- everything between the products (embeddings, LayerNorm, attention) runs in bf16, as on the
  bf16 path, while the pooler and the classifier (the score) stay in fp32 (`Fp32Input`).

End to end on that CPU (09f4bbf; docs/benchmarks.md): the MiniLM cross-encoder 2.06x fp32 pairs/s
(nDCG@10 +0.0052, p = 0.35; torch's eager int8 1.51x), MiniLM ingest 2.92x chunks/s (top-10
overlap 0.963; eager 1.59x); bf16 2.25x and 2.80x.

Activations keep one scale and zero point per call over all 8 bits (asymmetric: the FFN's GELU
outputs are nearly all positive), weights one scale per output channel, behind SmoothQuant's
per-channel scales (`smoothing_scale`), as on the eager path.

`torch.compile` needs a C++ compiler at run time; where it fails, `fused_quantizer` raises
`FusedInt8Unavailable` and `auto` keeps the eager kernels (`numerics.auto_int8_engine`).
"""

import contextlib
import copy
import functools
from collections.abc import Callable

import torch

import twostage.retrieval.models.numerics.cpu as cpu

FUSED_ENGINE = "onednn-fused"  # the `numerics.int8_engine` setting that selects this path
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: activation and weight ranges meet halfway

# the rows the quantizer is first compiled for: inductor takes its parallel and vector plan from
# the first sizes it sees (compiled on 5 rows, the packed cross-encoder's int8 ran 1.78x fp32, on a
# request's ~2,000 rows 2.03-2.13x; `bench/rerank_throughput.py --variants fp32,int8 --rounds 2`)
WARM_ROWS = 2048
Quantizer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class FusedInt8Unavailable(RuntimeError):
    """`torch.compile` could not build the quantizing kernel here (no C++ compiler, say)."""


def smoothing_scale(weight: torch.Tensor, activation_max: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale `s = max|x|^a / max|W|^(1-a)` (Xiao et al., 2023): the
    input is divided by `s` and the weight's columns multiplied by it, which leaves the product
    unchanged and moves the activations' outlier channels into the per-channel weight scales.
    `weight` may stack several layers that read the same input (`SharedInput`): one scale for all."""
    weight_max = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (
        activation_max.float().clamp(min=1e-5) ** SMOOTHING_ALPHA / weight_max ** (1 - SMOOTHING_ALPHA)
    ).clamp(min=1e-5)


def quantize_rows(
    x: torch.Tensor, inverse_scale: torch.Tensor, levels: int = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x * inverse_scale` as uint8 with one scale and zero point for the whole tensor, computed in
    fp32 whatever `x`'s dtype, over `levels` + 1 values (`activation_levels`). The range always
    holds 0, so zero (padding, ReLU-like outputs) is exact."""
    y = x.float() * inverse_scale
    low, high = torch.aminmax(y)
    scale = ((high.clamp(min=0) - low.clamp(max=0)) / levels).clamp(min=1e-8)
    zero_point = torch.round(-low.clamp(max=0) / scale)
    quantized = (torch.round(y / scale) + zero_point).clamp(0, levels).to(torch.uint8)
    return quantized, scale, zero_point.to(torch.int64)


def activation_levels() -> int:
    """255 (all 8 bits) where the CPU sums u8 x s8 products in 32 bits (VNNI, AMX-INT8); 127
    elsewhere, as torch's `reduce_range`: oneDNN's AVX2 kernel adds pairs of products in saturating
    16-bit lanes (2 x 255 x 127 > 32767). Measured on an AMD EPYC (a 64 -> 96 layer, three outlier
    input channels, mean error against fp32): 1.0% with VNNI on 8 bits; with oneDNN held to AVX2
    (`ONEDNN_MAX_CPU_ISA=AVX2`) 3.1% on 8 bits, 2.0% on 7."""
    return 255 if cpu.int8_full_range() else 127


def _quantize_rows_8_bits(
    x: torch.Tensor, inverse_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_rows(x, inverse_scale, 255)


def _quantize_rows_7_bits(
    x: torch.Tensor, inverse_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_rows(x, inverse_scale, 127)


# One function per range, its levels a literal in its code: given as `functools.partial`'s keyword,
# `dynamic=True` made them a graph input, and inductor's on-disk cache then served one range's
# kernel for the other (uint8 codes off by up to 128; found with the AVX2 emulation of the tests).
_BY_LEVELS = {255: _quantize_rows_8_bits, 127: _quantize_rows_7_bits}


def fused_quantizer() -> Quantizer:
    """The compiled `quantize_rows` for this CPU's `activation_levels`."""
    return _compiled_quantizer(activation_levels())


@functools.cache
def _compiled_quantizer(levels: int) -> Quantizer:
    """`quantize_rows` compiled once per process for any row count and width (`dynamic=True`), and
    run here, so that a missing compiler fails at load and no request waits for a compilation:
    in each grad mode a model runs in (compiled code is guarded on it: the first call under
    `inference_mode` recompiled for about a second), for two widths (the second generalizes the
    shapes)."""
    try:
        compiled: Quantizer = torch.compile(_BY_LEVELS[levels], dynamic=True)
        scales = {width: torch.ones(width) for width in (384, 1536)}  # as a layer's buffer: made outside
        for mode in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
            with mode():  # the activations are made inside, as a request's are
                for width, inverse_scale in scales.items():
                    compiled(torch.randn(WARM_ROWS, width, dtype=torch.bfloat16), inverse_scale)
    except Exception as exc:  # inductor's failures have no common base: any of them means no kernel
        raise FusedInt8Unavailable(
            f"torch.compile could not build the int8 quantizing kernel: {exc}"
        ) from exc
    return compiled


class SharedInput:
    """The quantized input of `readers` layers that read the same tensor, quantized once: a
    self-attention's query, key and value (with one smoothing scale, `smoothing_scale` over their
    stacked weights). Measured on the packed MiniLM cross-encoder: 1,116 quantizing calls for 30
    queries took 304 ms of 1,452 (profile, scratch); sharing removes a third of the calls.

    It keeps the input with its quantization until the last reader has taken it: while held, no
    other tensor can take its identity, so the `is` check cannot match a stale entry, and nothing
    stays held between requests. One tuple is read and written whole, so two threads at worst
    quantize twice."""

    def __init__(self, readers: int) -> None:
        self.readers = readers
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], int] | None = None

    def quantized(
        self, x: torch.Tensor, inverse_scale: torch.Tensor, quantize: Quantizer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last = self._last
        if last is not None and last[0] is x:
            result, waiting = last[1], last[2] - 1
        else:
            result, waiting = quantize(x.reshape(-1, x.shape[-1]), inverse_scale), self.readers - 1
        self._last = (x, result, waiting) if waiting > 0 else None
        return result


class FusedInt8Linear(torch.nn.Module):
    """A Linear as oneDNN's int8 product (AMX-INT8 where the CPU has it) on an input quantized by
    `fused_quantizer`, answering in `out_dtype` (bf16 inside a bf16 encoder).

    `smoothing`: the SmoothQuant scale when layers share their input (`shared`), else this
    layer's own. `gelu`: oneDNN applies the exact (erf) GELU to the output inside the product, as
    BERT's intermediate layer does after it (`fuses_gelu`): one pass over the 1,536-wide output
    fewer."""

    engine = FUSED_ENGINE  # as `SmoothedLinear.engine` records whose kernels run it
    inverse_scale: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        linear: torch.nn.Linear,
        activation_max: torch.Tensor,
        out_dtype: torch.dtype,
        *,
        smoothing: torch.Tensor | None = None,
        shared: SharedInput | None = None,
        gelu: bool = False,
    ) -> None:
        super().__init__()
        scale = smoothing_scale(linear.weight, activation_max) if smoothing is None else smoothing
        weight = linear.weight.detach().float() * scale[None, :]
        weight_scale = (weight.abs().amax(1) / 127).clamp(min=1e-12)
        int8 = torch.round(weight / weight_scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.out_features = linear.out_features
        self.out_dtype = out_dtype
        self.quantize = fused_quantizer()
        self.shared = shared
        self.post_op = "gelu" if gelu else "none"
        self.packed = torch.ops.onednn.qlinear_prepack(int8, None)  # oneDNN's blocked layout
        self.register_buffer("inverse_scale", 1.0 / scale)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", torch.zeros(linear.out_features, dtype=torch.int64))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            quantized, scale, zero_point = self.shared.quantized(x, self.inverse_scale, self.quantize)
        else:
            quantized, scale, zero_point = self.quantize(x.reshape(-1, x.shape[-1]), self.inverse_scale)
        out: torch.Tensor = torch.ops.onednn.qlinear_pointwise.tensor(
            quantized, scale, zero_point, self.packed, self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, self.out_dtype, self.post_op, [], "none" if self.post_op == "gelu" else "",
        )  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features)


def fuses_gelu(activation: torch.nn.Module) -> bool:
    """Whether `activation` is the exact (erf) GELU that oneDNN's `gelu` post-op computes:
    transformers' `GELUActivation` on `torch.nn.functional.gelu` (BERT's `hidden_act="gelu"`), or
    torch's own `GELU()`."""
    if isinstance(activation, torch.nn.GELU):
        return activation.approximate == "none"
    return type(activation).__name__ == "GELUActivation" and getattr(activation, "act", None) is (
        torch.nn.functional.gelu
    )


class Fp32Input(torch.nn.Module):
    """A module kept in fp32 inside a bf16 model (a pooler, a classifier): its input is cast up."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.module(x.float())
        return out


def fuse_int8(
    module: torch.nn.Module, maxima: dict[str, torch.Tensor], *, int8_down: bool, head_outputs: int
) -> None:
    """This route, in place (`numerics.quantize_int8`): the model in bf16, its Linear layers (those
    the calibration ran, `maxima`) as `FusedInt8Linear`, its heads in fp32 (`Fp32Input`: a
    pooler, and a Linear with fewer than `head_outputs` outputs). Every replacement is built from
    the fp32 weights, before the rest is cast, so a missing compiler (`FusedInt8Unavailable`)
    leaves the model as it was. Layers are found by BERT's names (`query`/`key`/`value`,
    `*SelfOutput`, `*Intermediate`); another family's run in int8 without the sharing and the bf16
    exceptions.

    A self-attention's query and key (and value, where it is int8) share one quantized input
    (`SharedInput`); an intermediate layer's exact GELU runs inside its product (`fuses_gelu`).
    Without `int8_down` (an embedder, whose vectors fill an index) the layers whose rounding goes
    straight into the output stay in bf16: the value and attention-output projections and the
    down projections. MiniLM, `bench/ingest.py --variants fp32,int8 --limit 3000`, one round each
    (scratch): top-10 overlap with the fp32-built index 0.9543 at 2.77x fp32 with only the down
    projections in bf16, 0.9667 at 2.86x with these. A cross-encoder (`int8_down`) is judged by its
    ranking and runs every encoder Linear in int8 (docs/benchmarks.md)."""
    named = dict(module.named_modules())
    heads = [n for n, m in named.items() if n and (type(m).__name__.endswith("Pooler") or (
        isinstance(m, torch.nn.Linear) and m.out_features < head_outputs))]  # fmt: skip
    heads = [n for n in heads if not any(n.startswith(f"{h}.") for h in heads)]  # the outermost
    bf16: set[str] = set()
    if not int8_down:
        for name, child in named.items():
            prefix = f"{name}." if name else ""
            if type(child).__name__.endswith("SelfOutput"):
                bf16.add(f"{prefix}dense")
            elif isinstance(named.get(f"{prefix}value"), torch.nn.Linear):
                bf16.add(f"{prefix}value")
    in_head = {n for n in named if any(n == h or n.startswith(f"{h}.") for h in heads)}
    int8 = {
        n: m for n, m in named.items()
        if isinstance(m, torch.nn.Linear) and n in maxima and n not in bf16 and n not in in_head
        and (int8_down or m.in_features <= m.out_features)  # a down projection stays bf16 unless int8_down
    }  # fmt: skip
    sharing: dict[str, tuple[SharedInput, torch.Tensor]] = {}
    for name in named:
        readers = [p for p in (f"{name}.{x}" if name else x for x in ("query", "key", "value")) if p in int8]
        if len(readers) > 1:
            weights = torch.cat([int8[r].weight for r in readers])
            scale = smoothing_scale(weights, maxima[readers[0]])  # one input, one set of maxima
            group = SharedInput(len(readers))
            sharing.update({r: (group, scale) for r in readers})
    gelu = {f"{n}.dense" for n, m in named.items() if type(m).__name__.endswith("Intermediate")
            and fuses_gelu(getattr(m, "intermediate_act_fn", torch.nn.Identity()))}  # fmt: skip
    replacements: dict[str, torch.nn.Module] = {n: Fp32Input(copy.deepcopy(named[n])) for n in heads}
    for name, linear in int8.items():  # FusedInt8Unavailable without a compiler, before any change
        shared, smoothing = sharing.get(name, (None, None))
        fused_gelu = name in gelu
        replacements[name] = FusedInt8Linear(
            linear, maxima[name], torch.bfloat16, smoothing=smoothing, shared=shared, gelu=fused_gelu
        )
        if fused_gelu:  # applied inside the product
            replacements[f"{name.removesuffix('.dense')}.intermediate_act_fn"] = torch.nn.Identity()
    module.to(torch.bfloat16)
    for name, replacement in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, replacement)
