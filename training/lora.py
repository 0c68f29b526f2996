"""Folding LoRA adapters into the base weights, for a standalone model to serve.

Adapters added through transformers' PEFT integration (`model.add_adapter`, which is what
sentence-transformers uses) live in peft's tuner layers inside the plain model; there is no
`merge_and_unload` on it, so each tuner layer is merged and replaced by its base layer here.
"""

from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer


def merge_lora(model: Any) -> Any:
    """Merge every LoRA layer of `model` into its base weights, in place; returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
    return model
