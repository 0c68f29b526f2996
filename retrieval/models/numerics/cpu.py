"""What this CPU offers the numeric paths: native bf16 products, 8-bit int8 activations, AMX-INT8.

Every CPU decision in `numerics` reads these three answers and nothing else, so one override
can make any machine answer as a smaller one: `TWOSTAGE_CPU_FEATURES` (a comma-separated list,
e.g. `avx2`) keeps only the detected features it names. With `ATEN_CPU_CAPABILITY=avx2` and
`ONEDNN_MAX_CPU_ISA=AVX2` (torch's and oneDNN's own kernel caps) that runs an AVX-512 or AMX
machine as an AVX2-only one, which is how the test suite checks the paths of CPUs it is not on.
It can only remove features: a kernel the CPU lacks would fault, not slow down.
"""

import functools
import os
import platform
from pathlib import Path

import torch

FEATURES_ENV = "TWOSTAGE_CPU_FEATURES"
BF16_FEATURES = ("amx_bf16", "avx512_bf16", "arm_bf16")  # the native bf16 products, best first
VNNI_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # u8 x s8 summed in 32 bits


@functools.cache
def _proc_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


@functools.cache
def detected_features() -> frozenset[str]:
    """The kernel's CPU flags, with the bf16 feature named as `native_bf16` names it: torch's own
    cpuinfo probes on x86 (`torch.cpu._is_amx_tile_supported`, `_is_avx512_bf16_supported`;
    private but stable since torch 2.3), `/proc/cpuinfo`'s `bf16` on Arm Linux."""
    flags = set(_proc_flags())
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        flags.add("amx_bf16")
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        flags.add("avx512_bf16")
    if platform.machine().lower() in {"aarch64", "arm64"} and "bf16" in flags:
        flags.add("arm_bf16")
    return frozenset(flags)


def cpu_features() -> frozenset[str]:
    """The detected features, less those `TWOSTAGE_CPU_FEATURES` leaves out (read on each call,
    so a test or a process can narrow it before loading a model)."""
    detected = detected_features()
    allowed = os.environ.get(FEATURES_ENV)
    if allowed is None or not allowed.strip():
        return detected
    return detected & {name.strip().lower() for name in allowed.split(",")}


def native_bf16() -> str | None:
    """The CPU feature that makes bf16 matrix products native here (`BF16_FEATURES`), or None."""
    features = cpu_features()
    return next((name for name in BF16_FEATURES if name in features), None)


def int8_full_range() -> bool:
    """Whether int8 activations may use all 8 bits: only where the CPU multiplies u8 x s8 with
    32-bit accumulation (x86 VNNI or AMX-INT8). Elsewhere the AVX2 kernels (fbgemm's, oneDNN's)
    sum pairs of products in saturating 16-bit lanes (255 * 127 * 2 > 32767), which is why torch's
    dynamic Linear quantizes activations to 7 bits (`reduce_range=True`) everywhere by default."""
    return bool(cpu_features() & VNNI_FEATURES)


def amx_int8() -> bool:
    """Whether oneDNN's int8 kernels run on AMX tiles here (fbgemm's do not use them)."""
    return "amx_int8" in cpu_features()
