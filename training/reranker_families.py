"""`fine_tune_reranker`: a reranker of either family trained the way it is served.

The families' trainers live in one module each (`reranker_training.py`: the Qwen3 yes/no
objective; `cross_encoder_training.py`: sentence-transformers' `CrossEncoderTrainer`); this is the
one place that picks between them, so neither imports the other's dispatcher.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

from twostage.training.cross_encoder_training import train_cross_encoder
from twostage.training.data import Example
from twostage.training.reranker_training import RerankerTrainSettings, train_reranker


def fine_tune_reranker(
    source: Path,
    family: str,
    train: list[Example],
    dev: list[Example],
    out_dir: Path,
    settings: RerankerTrainSettings,
    *,
    instruction: str,
    max_length: int,
    device: str,
) -> dict[str, Any]:
    """Train a reranker of either family with the trainer its family needs.

    `yes-no` (causal LM): the Qwen3 objective in this module. `cross-encoder` (sequence
    classification): sentence-transformers' `CrossEncoderTrainer`, which trains the whole
    model. `twostage train reranker` and `twostage retrain` both come through here, so a
    deployment of either family is retrained the way it is served.
    """
    if family == "cross-encoder":
        full = replace(settings, mode="full")
        return train_cross_encoder(source, train, dev, out_dir, full, max_length=max_length, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source)).to(device)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return train_reranker(
        model, tokenizer, train, dev, out_dir, settings, instruction=instruction, max_length=max_length
    )
