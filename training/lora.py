"""LoRA through peft's own API: wrap with `get_peft_model`, fold back with `merge_and_unload`.

Why not transformers' `add_adapter` integration (what `SentenceTransformer.add_adapter`
calls)? It gates itself on a minimum peft version that each transformers release may raise
past the newest peft published (transformers 5.24 demands peft >= 0.22 before that exists),
which stopped fine-tuning on a fresh install. peft's API is the source of truth either way;
calling it directly leaves transformers nothing to refuse.
"""

from pathlib import Path
from typing import Any

QWEN3_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_targets(model: Any, targets: list[str] | str | None = None) -> list[str] | str:
    """Qwen3's linear projections for Qwen models, peft's "all-linear" for the rest (unless given)."""
    if targets:
        return targets
    is_qwen = getattr(getattr(model, "config", None), "model_type", "") in {"qwen3", "qwen2"}
    return QWEN3_LINEAR if is_qwen else "all-linear"


def add_lora(model: Any, config: Any) -> Any:
    """`model` wrapped in a `PeftModel` whose LoRA layers are the only trainable parameters."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def merge_lora(model: Any) -> Any:
    """The plain model with every LoRA layer folded into its base weights (a `PeftModel` in)."""
    return model.merge_and_unload()


def load_lora_weights(model: Any, directory: Path) -> bool:
    """Load the adapter weights a checkpoint saved in `directory` (searched recursively) into the
    `PeftModel` `model`; False when the checkpoint holds none."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    found = sorted(directory.rglob(ADAPTER_WEIGHTS))
    if not found:
        return False
    result = set_peft_model_state_dict(model, load_file(str(found[0])))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {found[0]} has adapter weights this model lacks: {unexpected[:3]}")
    return True
