"""Reranker fine-tuning with the Qwen3-Reranker objective, LoRA by default.

The model sees exactly the inference prompt (`YesNoReranker.prompt_tokens`: template,
instruction, truncation of the document only) and is trained with binary cross-entropy on
z = logit(yes) - logit(no) at the last position, the quantity inference turns into
sigmoid(z). `pos_weight` = negatives per positive balances the classes; graded labels are
soft targets. Optionally (`loss="listwise"`) a softmax cross-entropy over z of one positive and
n mined negatives per query, which trains the ranking directly. Only the last position's logits
are computed (`logits_to_keep=1`). Training
runs in transformers' Trainer (evaluation every N steps, early stopping on dev loss, best
checkpoint, resume); LoRA is merged into a standalone model that `load_reranker` serves.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.batching import left_pad
from twostage.retrieval.models.yes_no_reranker import YesNoReranker
from twostage.training.data import Example, Graded, Pair
from twostage.training.lora import add_lora, lora_targets, merge_lora
from twostage.training.runs import check_memory, last_checkpoint, run_arguments


@dataclass
class RerankerTrainSettings:
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-4
    mode: str = "lora"  # lora | full | last-layers
    loss: str = "bce"  # bce | listwise
    group_negatives: int = 3  # listwise: negatives per positive in a group
    last_layers: int = 2
    lora_rank: int = 16
    lora_alpha: int = 32
    eval_steps: int = 50
    early_stopping_patience: int = 3
    seed: int = 0


def judgements(examples: list[Example]) -> list[Graded]:
    """Pairs expand to (query, positive, 1) and (query, negative, 0); graded stay as they are."""
    out: list[Graded] = []
    for e in examples:
        if isinstance(e, Pair):
            out.append(Graded(e.query, e.positive, 1.0, e.instruction))
            out += [Graded(e.query, n, 0.0, e.instruction) for n in e.negatives]
        else:
            out.append(e)
    return out


class _Prompts(TorchDataset[dict[str, Any]]):
    """Token ids of the exact inference prompt for each judgement, and its target."""

    def __init__(self, rows: list[Graded], reranker: YesNoReranker) -> None:
        self.items: list[dict[str, Any]] = []
        for row in rows:
            prompt = reranker.prompt_tokens(row.query, [row.document], row.instruction)
            self.items.append({"input_ids": prompt.full(0), "labels": row.label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def groups(examples: list[Example], negatives: int) -> list[Pair]:
    """Listwise groups: each pair with at least `negatives` negatives, cut to exactly that many."""
    return [
        Pair(e.query, e.positive, e.negatives[:negatives], e.instruction)
        for e in dict.fromkeys(examples)
        if isinstance(e, Pair) and len(e.negatives) >= negatives
    ]


class _Groups(TorchDataset[dict[str, Any]]):
    """Prompt ids of a positive followed by its negatives; the target is always index 0."""

    def __init__(self, rows: list[Pair], reranker: YesNoReranker) -> None:
        self.items: list[dict[str, Any]] = []
        for row in rows:
            prompt = reranker.prompt_tokens(row.query, [row.positive, *row.negatives], row.instruction)
            ids = [prompt.full(i) for i in range(1 + len(row.negatives))]
            self.items.append({"input_ids": ids, "labels": 0})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class _Collate:
    """Left-pads a batch; listwise groups are flattened row-major and `group` says their size."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        listwise = isinstance(batch[0]["input_ids"][0], list)
        rows = [ids for b in batch for ids in b["input_ids"]] if listwise else [b["input_ids"] for b in batch]
        ids, mask = left_pad(rows, self.pad_id, torch.device("cpu"))
        out = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([b["labels"] for b in batch])}
        if listwise:
            out["group"] = torch.tensor(len(batch[0]["input_ids"]))
        return out


class YesNoTrainer(Trainer):
    """BCE on z_yes - z_no at the last position (left padding puts every row's last token there)."""

    def __init__(self, *args: Any, yes_id: int, no_id: int, pos_weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yes_id, self.no_id = yes_id, no_id
        self.pos_weight = torch.tensor(pos_weight)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs.pop("labels")
        group = inputs.pop("group", None)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        z = logits[:, self.yes_id] - logits[:, self.no_id]
        if group is not None:  # listwise: softmax over each group, the positive is first
            loss = torch.nn.functional.cross_entropy(z.view(-1, int(group)), labels.to(z.device))
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                z, labels.float(), pos_weight=self.pos_weight.to(z.device)
            )
        return (loss, {"z": z}) if return_outputs else loss


def _datasets(
    train: list[Example], dev: list[Example], reranker: YesNoReranker, settings: RerankerTrainSettings
) -> tuple[_Prompts | _Groups, _Prompts | _Groups, float]:
    """Train/dev datasets for the chosen loss and BCE's pos_weight; refuses what cannot train."""
    if settings.loss == "listwise":
        n = settings.group_negatives
        train_groups, dev_groups = groups(train, n), groups(dev, n)
        if len(train_groups) < settings.batch_size or not dev_groups:
            raise InputError(
                f"{len(train_groups)} training and {len(dev_groups)} dev pairs have {n} or more "
                f"negatives: listwise training needs at least one batch ({settings.batch_size}) "
                f"and one dev group (mine more negatives, or lower group_negatives)"
            )
        return _Groups(train_groups, reranker), _Groups(dev_groups, reranker), 1.0
    if settings.loss != "bce":
        raise InputError(f"unknown reranker loss {settings.loss!r}: use bce or listwise")
    train_rows, dev_rows, pos_weight = bce_judgements(train, dev, settings.batch_size)
    return _Prompts(train_rows, reranker), _Prompts(dev_rows, reranker), pos_weight


def bce_judgements(
    train: list[Example], dev: list[Example], batch_size: int
) -> tuple[list[Graded], list[Graded], float]:
    """Deduplicated judgements for pointwise BCE and its pos_weight (negatives per positive);
    refuses sets that cannot train: less than a batch, no dev, or only one class."""
    train_rows, dev_rows = list(dict.fromkeys(judgements(train))), list(dict.fromkeys(judgements(dev)))
    if len(train_rows) < batch_size or not dev_rows:
        raise InputError(
            f"{len(train_rows)} training and {len(dev_rows)} dev judgements: need at least one batch "
            f"({batch_size}) to train and one to evaluate"
        )
    positives = sum(r.label for r in train_rows)
    if not positives or positives == len(train_rows):
        raise InputError(
            "reranker training needs both relevant and irrelevant examples (mine negatives first)"
        )
    return train_rows, dev_rows, (len(train_rows) - positives) / positives


def _rows(ids: list[Any]) -> list[list[int]]:
    """The token rows of a dataset item: one prompt, or a listwise group of them."""
    return ids if ids and isinstance(ids[0], list) else [ids]


def prepare(model: PreTrainedModel, settings: RerankerTrainSettings) -> Any:
    """LoRA adapters, full fine-tuning, or only the last N decoder layers trainable."""
    if settings.mode == "lora":
        from peft import LoraConfig, TaskType

        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=settings.lora_rank, lora_alpha=settings.lora_alpha,
            target_modules=lora_targets(model),
        )  # fmt: skip
        return add_lora(model, config)
    if settings.mode == "last-layers":
        layers = model.get_decoder().layers
        for p in model.parameters():
            p.requires_grad = False
        for layer in list(layers)[-settings.last_layers :]:
            for p in layer.parameters():
                p.requires_grad = True
        return model
    if settings.mode == "full":
        return model
    raise InputError(f"unknown training mode {settings.mode!r}: use lora, full or last-layers")


def train_reranker(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    dev: list[Example],
    out_dir: Path,
    settings: RerankerTrainSettings,
    *,
    instruction: str,
    max_length: int,
) -> dict[str, Any]:
    """Train, merge, save `out_dir/model` (model + tokenizer), and return losses and settings."""
    from transformers import EarlyStoppingCallback

    reranker = YesNoReranker(
        model, tokenizer, model_id="training", max_length=max_length, instruction=instruction
    )
    train_set, dev_set, pos_weight = _datasets(train, dev, reranker, settings)
    trainable = prepare(model, settings)
    longest = max(len(ids) for item in train_set.items for ids in _rows(item["input_ids"]))
    rows = settings.batch_size * (1 + settings.group_negatives if settings.loss == "listwise" else 1)
    check_memory(trainable, rows, longest)
    args = TrainingArguments(
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        remove_unused_columns=False,
        **run_arguments(
            out_dir, settings.eval_steps, "eval_loss", greater_is_better=False, seed=settings.seed
        ),
    )
    trainer = YesNoTrainer(
        model=trainable,
        args=args,
        train_dataset=train_set,
        eval_dataset=dev_set,
        data_collator=_Collate(reranker._pad_id),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience)],
        yes_id=reranker.yes_id,
        no_id=reranker.no_id,
        pos_weight=pos_weight,
    )
    base_loss = trainer.evaluate()["eval_loss"]
    resumed_from = last_checkpoint(out_dir)
    trainer.train(resume_from_checkpoint=resumed_from)
    best_loss = trainer.evaluate()["eval_loss"]
    merged = merge_lora(trainable) if settings.mode == "lora" else trainable
    model_dir = out_dir / "model"
    merged.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return {
        "base_dev_loss": base_loss,
        "best_dev_loss": best_loss,
        "pos_weight": pos_weight,
        "loss": settings.loss,
        "train_items": len(train_set),
        "dev_items": len(dev_set),
        "steps": trainer.state.global_step,
        "resumed_from": resumed_from,
        "model_dir": str(model_dir),
    }
