"""What `dtype` means on a device: bf16 where it is native (to be measured), fp32 elsewhere."""

import logging
from dataclasses import dataclass

import torch

import twostage.retrieval.models.numerics.cpu as cpu
from twostage.retrieval.core.errors import ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        feature = cpu.native_bf16() if device.type == "cpu" else None
        if feature is not None:
            return DtypeChoice(torch.bfloat16, True, f"CPU with {feature}")
        return DtypeChoice(torch.float32, False, f"{device.type} without native bf16")
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32 and cpu.native_bf16() is None:
        why = f"dtype {name} asked for on a CPU without native bf16 (no avx512_bf16, AMX or Arm bf16)"
        if strict:
            raise ModelLoadError(f"{why}; use dtype=auto or float32 (or unset numerics.strict)")
        log.warning("%s: running in float32, which is faster and exact here", why)
        return DtypeChoice(torch.float32, False, why)
    return DtypeChoice(dtype, False, f"dtype {name} asked for")
