"""Device choice: CUDA when present, CPU otherwise (the dtype is `numerics.choose_dtype`'s)."""

import torch

from twostage.retrieval.core.errors import ModelLoadError


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; an explicit device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available; use device=auto or cpu")
    return device
