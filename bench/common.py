"""What every benchmark prints next to its numbers: commit, machine, library versions."""

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "debian-ir"


def run_info(device: str) -> dict[str, Any]:
    """Commit, machine and versions, so a figure can always be traced to what produced it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    machine |= cpu_info()
    return {
        "commit": commit + ("-dirty" if dirty else ""), "machine": machine, "torch": torch.__version__,
        "versions": {name: _version(name) for name in VERSIONED},
    }  # fmt: skip


VERSIONED = ("transformers", "sentence-transformers", "peft", "qdrant-edge-py", "qdrant-client", "numpy")
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "bf16",
    "i8mm",
)


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the flags that decide its bf16/int8 speed (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor()}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu": fields.get("model name", platform.processor()),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


EMBEDDER = "pypi:all-MiniLM-L6-v2"  # the offline models the end-to-end benches run
RERANKER = "pypi:SmolLM2-135M-Instruct"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of a JSONL file."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


NUMERIC_VARIANTS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


def parse_variants(text: str) -> list[str]:
    """`--variants fp32,bf16,int8`: fp32 first (the baseline the others are compared with)."""
    variants = text.split(",")
    if variants[0] != "fp32" or any(v not in NUMERIC_VARIANTS for v in variants):
        raise SystemExit(f"--variants: fp32 first, then any of {sorted(NUMERIC_VARIANTS)}; got {text}")
    return variants


def variant_settings(variant: str, role: str, model: str, **rest: Any) -> Any:
    """Settings that load `model` as `role` on the numeric path `variant` (int8: from fp32 weights)."""
    from twostage.api.settings import Settings

    int8 = variant == "int8"
    return Settings(
        **{role: {"model": model, "quantize": "int8" if int8 else "none"}},
        dtype="float32" if int8 else NUMERIC_VARIANTS[variant],
        **rest,
    )


def interleaved_speeds(seconds: dict[str, list[float]], items: int) -> dict[str, dict[str, Any]]:
    """Items/s per variant and each one's speedup over fp32, from rounds run interleaved.

    Every round times each variant once, back to back, so a slow spell on shared cores hits
    all variants of that round alike: the speedup is the median of the per-round ratios (a
    paired measurement), not the ratio of two medians. `seconds[variant][round]`, fp32 first.
    """
    import statistics

    baseline = seconds["fp32"]
    speeds: dict[str, dict[str, Any]] = {}
    for variant, times in seconds.items():
        row: dict[str, Any] = {"per_s": round(items / statistics.median(times), 2), "rounds": len(times)}
        if variant != "fp32":
            ratios = [b / t for b, t in zip(baseline, times, strict=True)]
            row |= {"speedup_vs_fp32": round(statistics.median(ratios), 2),
                    "speedup_per_round": [round(r, 2) for r in ratios]}  # fmt: skip
        speeds[variant] = row
    return speeds


INT8_ENGINES = ["auto", "fbgemm", "onednn", "onednn-fused"]  # settings numerics.int8_engine


def int8_layers_engine(model: object) -> str | None:
    """Whose kernels run a loaded model's int8 layers, as the layers record it (None: no int8)."""
    from twostage.retrieval.models.numerics import SmoothedLinear
    from twostage.retrieval.models.numerics.fused_int8 import FusedInt8Linear

    modules = model.modules() if isinstance(model, torch.nn.Module) else []
    return (
        ",".join(sorted({m.engine for m in modules if isinstance(m, SmoothedLinear | FusedInt8Linear)}))
        or None
    )


def in_threads(work: Callable[[int], None], n: int) -> float:
    """Run `work(0)` ... `work(n - 1)` in `n` threads at once; the wall seconds until all end."""
    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began
