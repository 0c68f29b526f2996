"""bf16 layer surgery: `Bf16Linear` (a product in bf16 inside an fp32 model) and the causal-LM
path built from it (`bf16_matmuls`), used where `dtype` is bf16 on a CPU and by the int8 paths
for the layers int8 cannot hold."""

import functools
from typing import Any

import torch

import twostage.retrieval.models.numerics.cpu as cpu
from twostage.retrieval.core.errors import ModelLoadError
from twostage.retrieval.models.packed_attention import register_packed


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
    (docs/models.md, Numeric paths): the whole model in bf16 ran 1.68x fp32 (one pass, AMD EPYC) but moved
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
        replace_module(model, name, Bf16Linear(linear))
    amx = cpu.native_bf16() == "amx_bf16"  # where bf16 attention and SwiGLU were measured to pay
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


def replace_module(module: torch.nn.Module, name: str, replacement: torch.nn.Module) -> None:
    if not name:
        raise ModelLoadError("quantize=int8 takes a model, not a bare Linear layer")
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, replacement)
