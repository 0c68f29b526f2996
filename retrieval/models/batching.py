"""Grouping variable-length inputs into forward passes under a padded-token budget."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# Padding is computed like real tokens and thrown away, on every device. Measured on a 2-core
# CPU with SmolLM2-135M: 16 documents of 37-207 tokens in one padded batch ran at the same
# tokens/s as unpadded rows, so the 48% padding doubled the time. A batch is closed when
# the next (shorter) row would push its padding above this fraction.
MAX_PADDING = 0.1


def token_budget_batches(
    lengths: Sequence[int], budget: int, max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows x longest) stays within `budget`
    and whose padding stays within `max_padding` of it.

    Inputs are taken longest first, so each batch holds similar lengths; the first (largest)
    batches also surface an out-of-memory early. An input longer than the budget on its own
    still gets a batch of one.
    """
    if budget < 1:
        raise ValueError("budget must be positive")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            padded = (len(current) + 1) * lengths[current[0]]
            if padded > budget or padded - (real + lengths[i]) > max_padding * padded:
                batches.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def token_packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices, in order, grouped into packed rows of at most `budget` tokens (no padding, so
    no sorting); an input longer than the budget on its own still gets a row of one."""
    if budget < 1:
        raise ValueError("budget must be positive")
    packs: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if not packs or total + n > budget:
            packs.append([])
            total = 0
        packs[-1].append(i)
        total += n
    return packs


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
