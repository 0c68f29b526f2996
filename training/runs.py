"""What every training run shares: evaluation and checkpoint cadence, best-model selection, resume."""

import json
from pathlib import Path
from typing import Any

import torch

from twostage.retrieval.core.errors import InputError


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
    """The newest complete checkpoint of an interrupted run in `out_dir` (None: start fresh).

    A run killed while saving leaves a checkpoint without a readable `trainer_state.json`
    (the trainer writes it after the weights and optimizer); that one is skipped.
    """
    found = sorted((out_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for checkpoint in reversed(found):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(checkpoint)
    return None


def available_memory(device: torch.device) -> int:
    """Free bytes where training will allocate: the GPU's free memory, else the host's available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: do not refuse


def check_memory(
    model: torch.nn.Module, rows: int, tokens: int, *, gradient_checkpointing: bool = False
) -> None:
    """Refuse a batch that cannot fit before the trainer starts, not an hour into it.

    Estimate: fp32 weights, gradient + two Adam moments for trainable parameters, and the
    activations kept for backward per layer (Korthikanti et al. 2022: 34·s·b·h + 5·a·s²·b bytes
    at 16 bits; doubled for fp32; one layer's worth with gradient checkpointing). Rough by
    design: it catches settings that are off by multiples, not by percent.
    """
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (hidden and layers and heads):
        return
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = 2 * (34 * tokens * rows * hidden + 5 * heads * tokens * tokens * rows)
    need = 4 * params + 12 * trainable + per_layer * (1 if gradient_checkpointing else layers)
    device = next(model.parameters()).device
    free = available_memory(device)
    if need > free:
        raise InputError(
            f"a training batch of {rows} sequences x {tokens} tokens needs about {need / 2**30:.1f} GiB, "
            f"but {device} has {free / 2**30:.1f} GiB free: lower --batch-size or --max-length, "
            "or use LoRA / gradient checkpointing"
        )
