"""Embedder fine-tuning with sentence-transformers' trainer, LoRA by default.

MultipleNegativesRankingLoss (or its cached variant for large batches) over in-batch and
mined negatives, optionally with in-batch false negatives masked (GISTEmbedLoss, the model
as its own guide), `BatchSamplers.NO_DUPLICATES` so a batch never holds the same text twice
(which would turn a positive into a false in-batch negative), optional MatryoshkaLoss.
The Qwen3 query prompt is applied to the anchor column through the trainer's `prompts`,
so training sees queries exactly as inference embeds them. Evaluation on dev every
`eval_steps`, early stopping, the best checkpoint kept, and an interrupted run resumes
from its last checkpoint. LoRA adapters are merged into a standalone model for serving,
which is evaluated again after the merge.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer

from twostage.retrieval.core.errors import InputError
from twostage.training.data import Pair
from twostage.training.lora import add_lora, load_lora_weights, lora_targets, merge_lora
from twostage.training.runs import check_memory, last_checkpoint, run_arguments
from twostage.training.settings import TrainingSettings
from twostage.training.st_model import by_instruction, load_st_embedder, prompt_for


@dataclass
class EmbedderTrainSettings:
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-4  # LoRA; use ~2e-5 for full fine-tuning
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None: Qwen3 projections, else "all-linear"
    cached_loss_mini_batch: int | None = None  # CachedMNRL with this mini-batch (large batches, flat memory)
    matryoshka_dims: list[int] = field(default_factory=list)
    eval_steps: int = 50
    early_stopping_patience: int = 3
    gradient_checkpointing: bool = False
    # ms-swift's INFONCE_MASK_FAKE_NEGATIVE as sentence-transformers' GISTEmbedLoss, the model its
    # own guide: an in-batch negative the model scores above the anchor's positive (minus the margin)
    # is probably another right answer, and is left out of the softmax instead of pushed away
    mask_false_negatives: bool = False
    false_negative_margin: float = 0.0
    seed: int = 0


def pairs_dataset(pairs: list[Pair]) -> Dataset:
    """anchor / positive / negative_1..k columns (k = the fewest negatives any pair has)."""
    if not pairs:
        raise InputError("no training pairs")
    k = min(len(p.negatives) for p in pairs)
    columns: dict[str, list[str]] = {
        "anchor": [p.query for p in pairs],
        "positive": [p.positive for p in pairs],
    }
    for i in range(k):
        columns[f"negative_{i + 1}"] = [p.negatives[i] for p in pairs]
    return Dataset.from_dict(columns)


def training_datasets(
    train: list[Pair], prompt: Callable[[str | None], str | None]
) -> tuple[Dataset | DatasetDict, dict[str, Any]]:
    """The trainer's dataset(s) and `prompts`: one dataset per instruction, each anchor column
    with the prompt serving gives that instruction (a single instruction: one plain dataset)."""
    groups = by_instruction(train, lambda p: p.instruction)
    if len(groups) == 1:
        ((instruction, pairs),) = groups.items()
        text = prompt(instruction)
        return pairs_dataset(pairs), ({"anchor": text} if text else {})
    names = {instruction: f"instruction-{i}" for i, instruction in enumerate(groups)}
    datasets = DatasetDict({names[i]: pairs_dataset(pairs) for i, pairs in groups.items()})
    return datasets, {names[i]: {"anchor": text} for i in groups if (text := prompt(i))}


def ir_evaluator(dev: list[Pair], prompt: Callable[[str | None], str | None], name: str = "dev") -> Any:
    """NDCG@10 / MRR@10 / Recall@k / MAP over dev queries against all dev passages, each query
    with the prompt serving gives its instruction (`prompt`). One prompt for all goes through
    the evaluator's `query_prompt`; several (instruction-aware models only, last-token pooled)
    are written before each query."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    passages: dict[str, str] = {}
    for p in dev:
        for text in (p.positive, *p.negatives):
            passages.setdefault(text, f"d{len(passages)}")
    prompts = [prompt(p.instruction) for p in dev]
    shared = prompts[0] if len(set(prompts)) == 1 else None
    queries: dict[str, Any] = {
        f"q{i}": p.query if len(set(prompts)) == 1 else (prompts[i] or "") + p.query
        for i, p in enumerate(dev)
    }
    relevant = {f"q{i}": {passages[p.positive]} for i, p in enumerate(dev)}
    return InformationRetrievalEvaluator(
        queries=queries,
        corpus={doc_id: text for text, doc_id in passages.items()},
        relevant_docs=relevant,
        precision_recall_at_k=[1, 10, 100],
        query_prompt=shared,
        name=name,
        write_csv=False,
    )


def contrastive_loss(model: SentenceTransformer, settings: EmbedderTrainSettings) -> Any:
    """InfoNCE over in-batch and mined negatives: MNRL, or with false negatives masked (GIST,
    the model its own guide, at MNRL's temperature), cached for large batches."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedGISTEmbedLoss,
        CachedMultipleNegativesRankingLoss,
        GISTEmbedLoss,
        MultipleNegativesRankingLoss,
    )

    temperature = 1 / 20  # MultipleNegativesRankingLoss's default scale of 20
    mini_batch = settings.cached_loss_mini_batch
    if settings.mask_false_negatives:
        masking: dict[str, Any] = {  # query-to-document terms only, as MNRL: the masking is the difference
            "margin_strategy": "absolute", "margin": settings.false_negative_margin,
            "contrast_anchors": False, "contrast_positives": False,
        }  # fmt: skip
        if mini_batch:
            return CachedGISTEmbedLoss(
                model, model, temperature=temperature, mini_batch_size=mini_batch, **masking
            )
        return GISTEmbedLoss(model, model, temperature=temperature, **masking)
    if mini_batch:
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    return MultipleNegativesRankingLoss(model)


def train_embedder(
    model: SentenceTransformer,
    train: list[Pair],
    dev: list[Pair],
    out_dir: Path,
    settings: EmbedderTrainSettings,
    *,
    app: TrainingSettings,
) -> dict[str, Any]:
    """Fine-tune `model` in place; write the merged model to `out_dir/model`; return the metrics.

    Queries get the prompt serving gives their pair's instruction (`st_model.prompt_for`):
    pairs with different instructions train as one dataset each, with its own anchor prompt.
    The merged model is loaded back from disk and evaluated again ("merged"), which proves the
    served model is the trained one.
    """
    from peft import LoraConfig, TaskType
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import EarlyStoppingCallback

    if len(train) < settings.batch_size:
        raise InputError(
            f"{len(train)} training pairs is fewer than one batch of {settings.batch_size}: "
            "add pairs or lower --batch-size (in-batch negatives need a full batch)"
        )
    if not dev:
        raise InputError("no dev pairs to evaluate on")
    evaluator = ir_evaluator(dev, partial(prompt_for, model))
    before = evaluator(model)
    metric = f"eval_{evaluator.primary_metric}"  # known once the evaluator has run
    if settings.lora:
        backbone: Any = model[0].auto_model
        model[0].model = add_lora(  # `auto_model` is a read-only view of `model` (sentence-transformers 6)
            backbone,
            LoraConfig(
                task_type=TaskType.FEATURE_EXTRACTION,
                r=settings.lora_rank,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                target_modules=lora_targets(backbone, settings.target_modules),
            ),
        )
    texts_per_pair = 2 + min(len(p.negatives) for p in train)
    rows = (settings.cached_loss_mini_batch or settings.batch_size) * texts_per_pair
    backbone_model: Any = model[0].auto_model
    longest = sorted({t for p in train for t in (p.query, p.positive, *p.negatives)}, key=len)[-32:]
    tokens = max(len(ids) for ids in model.tokenizer(longest)["input_ids"])  # batches pad to their longest
    check_memory(backbone_model, rows, min(tokens + 64, int(model.max_seq_length or 512)),
                 gradient_checkpointing=settings.gradient_checkpointing)  # fmt: skip
    loss = contrastive_loss(model, settings)
    train_dataset, prompts = training_datasets(train, partial(prompt_for, model))
    if settings.matryoshka_dims:
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=settings.matryoshka_dims)
    args = SentenceTransformerTrainingArguments(
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=prompts or None,
        gradient_checkpointing=settings.gradient_checkpointing,
        **run_arguments(out_dir, settings.eval_steps, metric, greater_is_better=True, seed=settings.seed),
    )
    trainer = _trainer_class(settings.lora)(
        model=model,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience)],
    )
    resumed_from = last_checkpoint(out_dir)
    trainer.train(resume_from_checkpoint=resumed_from)
    best = evaluator(model)
    if settings.lora:
        model[0].model = merge_lora(model[0].auto_model)
    merged_dir = out_dir / "model"
    model.save(str(merged_dir))
    merged = evaluator(load_st_embedder(merged_dir, app, device=str(model.device)))
    return {
        "base": before,
        "best": best,
        "merged": merged,
        "primary_metric": evaluator.primary_metric,
        "model_dir": str(merged_dir),
        "steps": trainer.state.global_step,
        "resumed_from": resumed_from,
    }


def _trainer_class(lora: bool) -> Any:
    """sentence-transformers' trainer; with LoRA, one that restores checkpoints through peft.

    A LoRA checkpoint holds only the adapter (`PeftModel.save_pretrained`). The stock
    `_load_from_checkpoint` (used to resume and to load the best checkpoint at the end)
    rebuilds a whole model from it through transformers' adapter loading, which is exactly
    the version-gated integration this module avoids; here the adapter weights are set on
    the model being trained with peft's `set_peft_model_state_dict` instead.
    """
    from sentence_transformers import SentenceTransformerTrainer

    if not lora:
        return SentenceTransformerTrainer

    class LoraTrainer(SentenceTransformerTrainer):
        def _load_from_checkpoint(self, checkpoint_path: str, model: Any = None) -> None:
            if not load_lora_weights(self.model[0].auto_model, Path(checkpoint_path)):
                raise InputError(f"checkpoint {checkpoint_path} holds no LoRA adapter to resume from")

    return LoraTrainer
