"""int8 quantisation of the small encoders' Linear layers: torch's dynamic int8 kernels behind
SmoothQuant scales (`quantize_int8`), or the fused route (`fused_int8`), and which engine runs them."""

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

import twostage.retrieval.models.numerics.cpu as cpu
import twostage.retrieval.models.numerics.fused_int8 as fused_int8
from twostage.retrieval.core.errors import ModelLoadError
from twostage.retrieval.models.numerics.bf16 import Bf16Linear, replace_module

log = logging.getLogger(__name__)

INT8_PATH = "int8-dynamic"  # what `numeric_path` calls a model with torch's dynamic int8 layers
INT8_FUSED_PATH = "int8-fused"  # ... and one with `FusedInt8Linear` layers in bf16 (other vectors)


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

    Measured there (Intel Xeon with AMX, 2 threads; docs/benchmarks.md), int8 on the fused path
    (`fused_int8`, 09f4bbf): MiniLM ingest (`bench/ingest.py --variants fp32,bf16,int8`) bf16
    2.80x fp32 with top-10 overlap 0.987, int8 2.92x with 0.963; the MiniLM cross-encoder
    (`bench/rerank_throughput.py --variants fp32,bf16,int8`) bf16 2.25x with scores within 0.021
    and nDCG@10 unchanged, int8 2.06x with scores within 0.33. On torch's eager int8 kernels (no
    C++ compiler for `torch.compile`) int8 ran 1.5-1.6x (cadd4f4, e42f7b9).
    """
    if cpu.native_bf16() != "amx_bf16":
        return None
    return (
        f"quantize=int8 for the {role} {model} on a CPU with AMX: bf16 is as fast here and closer to fp32 "
        "(MiniLM measured 2.3-2.8x fp32 in bf16, 2.1-2.9x in int8); set dtype=bfloat16 and quantize=none"
    )


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
    if cpu.amx_int8() and "onednn" in torch.backends.quantized.supported_engines:
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
        scale = fused_int8.smoothing_scale(linear.weight, activation_max)
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
    with the fp32-built one needs them in bf16 (docs/models.md). `engine` is the quantized engine the
    layers are packed for (`int8_engine`; None: torch's default, fbgemm on x86), or
    `onednn-fused`: the model in bf16 with oneDNN's int8 products on inputs quantized by one
    compiled kernel (`fused_int8.fuse_int8`; needs `calibrate`), the default on a CPU with
    AMX-INT8 (`auto_int8_engine`).

    Chosen by measurement (docs/models.md, Numeric paths), MiniLM over 256 debian-ir documents, worst /
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
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    if engine == fused_int8.FUSED_ENGINE:
        if calibrate is None:
            raise ModelLoadError(
                f"int8 engine {fused_int8.FUSED_ENGINE} needs calibration (the load's probes)"
            )
        try:
            fused_int8.fuse_int8(
                module, _activation_maxima(module, calibrate), int8_down=int8_down, head_outputs=HEAD_OUTPUTS
            )
        except fused_int8.FusedInt8Unavailable as exc:
            raise ModelLoadError(f"int8 engine {fused_int8.FUSED_ENGINE}: {exc}") from exc
        return
    quantized = _full_range_linear() if cpu.int8_full_range() else DynamicLinear
    maxima = _activation_maxima(module, calibrate) if calibrate is not None else {}
    bf16 = cpu.native_bf16() is not None
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
            replace_module(module, name, replacement)


def auto_int8_engine(packed: bool) -> str | None:
    """`int8_engine=auto`: on a CPU with AMX-INT8 the fused path (`fused_int8`) where
    `torch.compile` works, else (one warning) oneDNN's eager kernels for a reranker that packs its
    pairs, whose few row counts reuse them (`int8_engine`); torch's default (fbgemm) elsewhere.
    Measured on an Intel Xeon with AMX (docs/benchmarks.md): see `int8_advice`."""
    if int8_engine() != "onednn":
        return None
    try:
        fused_int8.fused_quantizer()
    except fused_int8.FusedInt8Unavailable as exc:
        log.warning("%s; int8 runs torch's eager kernels, which are slower", exc)
        return "onednn" if packed else None
    return fused_int8.FUSED_ENGINE
