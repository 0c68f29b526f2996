"""What every training run shares: evaluation and checkpoint cadence, best-model selection, resume."""

from pathlib import Path
from typing import Any

import torch


def run_arguments(
    out_dir: Path, eval_steps: int, metric: str, greater_is_better: bool, seed: int
) -> dict[str, Any]:
    """Trainer arguments for: evaluate and checkpoint every `eval_steps`, keep the best (by `metric`)
    and the latest checkpoint, bf16 autocast on CUDA when supported, no external loggers."""
    return {
        "output_dir": str(out_dir / "checkpoints"),
        "warmup_steps": 0.1,  # a fraction of the steps (transformers v5)
        "eval_strategy": "steps",
        "eval_steps": eval_steps,
        "save_strategy": "steps",
        "save_steps": eval_steps,
        "save_total_limit": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": greater_is_better,
        "logging_steps": max(1, eval_steps // 5),
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "report_to": "none",
        "seed": seed,
        "use_cpu": not torch.cuda.is_available(),
    }


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint of an interrupted run in `out_dir`, to resume from (None: start fresh)."""
    found = sorted((out_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None
