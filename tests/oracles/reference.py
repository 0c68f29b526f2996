"""The official Qwen3 model-card recipes, kept as the parity oracle.

Tests and benchmarks compare the service's embedder and reranker against these functions.
They follow the model cards' transformers code: one left-padded batch, full-vocabulary
logits, log_softmax over [no, yes]; last_token_pool + normalize for embeddings. Do not
"optimise" them: their slowness is the point of comparison.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from twostage.retrieval.models.prompts import RERANKER_PREFIX, RERANKER_SUFFIX, reranker_body


def last_token_pool(last_hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Qwen3-Embedding model card: hidden state of each sequence's last real token."""
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


@torch.no_grad()
def recipe_embed(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 8192
) -> Tensor:
    """Qwen3-Embedding model card: tokenizer(padding, truncation) -> last_token_pool -> normalize."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = batch.to(model.device)
    outputs = model(**batch)
    embeddings = last_token_pool(outputs.last_hidden_state, batch["attention_mask"])
    return F.normalize(embeddings, p=2, dim=1)


@torch.no_grad()
def recipe_rerank(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    instruction: str,
    max_length: int = 8192,
) -> list[float]:
    """Qwen3-Reranker model card: format, truncate the body, pad left, full logits, softmax [no, yes]."""
    tokenizer.padding_side = "left"
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix_tokens = tokenizer.encode(RERANKER_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(RERANKER_SUFFIX, add_special_tokens=False)
    texts = [reranker_body(instruction, q, d) for q, d in pairs]
    inputs = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    inputs = inputs.to(model.device)
    # The model card keeps only the last position's logits; logits_to_keep=1 computes just those
    # (the same values) instead of a (batch, length, 151,669) tensor it would throw away.
    batch_scores = model(**inputs, logits_to_keep=1).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return batch_scores[:, 1].exp().tolist()
