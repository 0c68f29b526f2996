"""Fine-tuning sequence-classification rerankers with sentence-transformers' `CrossEncoderTrainer`.

For classic cross-encoders (BERT/XLM-R style, or any model whose config is not a causal LM):
binary cross-entropy on the single logit with `pos_weight` = negatives per positive, graded
labels as soft targets, evaluation loss every N steps, early stopping, the best checkpoint
kept. The result is a plain CrossEncoder directory that `load_reranker` serves. Causal yes/no
rerankers (Qwen3-Reranker) train in `training.reranker_training` instead.
"""

from pathlib import Path
from typing import Any

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.tokens import split_markers_in_text
from twostage.training.data import Example
from twostage.training.reranker_training import RerankerTrainSettings, bce_judgements
from twostage.training.runs import last_checkpoint, run_arguments


def train_cross_encoder(
    model_path: Path,
    train: list[Example],
    dev: list[Example],
    out_dir: Path,
    settings: RerankerTrainSettings,
    *,
    max_length: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train from `model_path`, save `out_dir/model`, return base/best dev loss and sizes."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import EarlyStoppingCallback, set_seed

    if settings.loss != "bce" or settings.mode != "full":
        raise InputError("cross-encoder rerankers train with --loss bce and --mode full")
    train_rows, dev_rows, pos_weight = bce_judgements(train, dev, settings.batch_size)

    def dataset(rows: list[Any]) -> Dataset:
        return Dataset.from_dict({
            "query": [r.query for r in rows], "document": [r.document for r in rows],
            "label": [float(r.label) for r in rows],
        })  # fmt: skip

    set_seed(settings.seed)  # the new classification head is initialised here, before the trainer seeds
    model = CrossEncoder(
        str(model_path), num_labels=1, max_length=max_length, device=device, local_files_only=True
    )
    split_markers_in_text(model.tokenizer, by_default=True)  # trained on text exactly as it is served
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(pos_weight))
    args = CrossEncoderTrainingArguments(
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        **run_arguments(
            out_dir, settings.eval_steps, "eval_loss", greater_is_better=False, seed=settings.seed
        ),
    )
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=dataset(train_rows), eval_dataset=dataset(dev_rows), loss=loss,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience)],
    )  # fmt: skip
    base_loss = trainer.evaluate()["eval_loss"]
    resumed_from = last_checkpoint(out_dir)
    trainer.train(resume_from_checkpoint=resumed_from)
    best_loss = trainer.evaluate()["eval_loss"]
    model_dir = out_dir / "model"
    model.save_pretrained(str(model_dir))
    return {
        "family": "cross-encoder", "base_dev_loss": base_loss, "best_dev_loss": best_loss,
        "pos_weight": pos_weight, "train_items": len(train_rows), "dev_items": len(dev_rows),
        "steps": trainer.state.global_step, "resumed_from": resumed_from, "model_dir": str(model_dir),
    }  # fmt: skip
