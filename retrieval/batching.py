"""Grouping variable-length inputs into forward passes under a padded-token budget."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows x longest) stays within `budget`.

    Inputs are taken longest first, so each batch holds similar lengths and little padding;
    the first (largest) batches also surface an out-of-memory early. An input longer than
    the budget on its own still gets a batch of one.
    """
    if budget < 1:
        raise ValueError("budget must be positive")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * width > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: "torch.device"
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Left-padded `input_ids` and `attention_mask` tensors, so position -1 is every row's last token."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: "torch.device") -> "torch.Tensor":
    """Right-padded `input_ids`; with causal attention no real token ever sees the padding."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)
