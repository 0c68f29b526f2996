"""Qwen3-Embedding semantics: instruction-prefixed queries, last-token pooling, L2 norm.

Equal (within 1e-5 in fp32) to the model card's recipe, but inputs are sorted by length
and grouped under a padded-token budget, so a batch of mixed lengths wastes little compute
on padding and memory stays bounded whatever the batch size.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from twostage.retrieval.core.errors import InputError, ModelLoadError
from twostage.retrieval.models.batching import left_pad, token_budget_batches
from twostage.retrieval.models.embedder import LocalModelIdentity, QwenQueryPrompt
from twostage.retrieval.models.numerics import bf16_matmuls, causal_lm_dtype
from twostage.retrieval.models.prompts import clip_for_tokens, require_text
from twostage.retrieval.models.settings import EmbedderSettings
from twostage.retrieval.models.source import ModelSource, model_identity
from twostage.retrieval.models.tokens import TokenCounter, split_markers_in_text

END_OF_TEXT = "<|endoftext|>"


class LastTokenEmbedder(QwenQueryPrompt, LocalModelIdentity):
    """Embeds with a decoder model by reading the hidden state of the final `<|endoftext|>`."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str,
        max_length: int = 8192,
        batch_tokens: int = 16384,
        dim: int | None = None,
        instruction: str,
    ) -> None:
        hidden = int(model.config.hidden_size)
        if dim is not None and not 1 <= dim <= hidden:
            raise InputError(f"dim must be between 1 and the model's {hidden} dimensions, got {dim}")
        eod = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if not isinstance(eod, int) or eod == tokenizer.unk_token_id:
            raise ModelLoadError(f"{model_id}: tokenizer has no {END_OF_TEXT} token for last-token pooling")
        self.model = model
        self.tokenizer = split_markers_in_text(tokenizer)  # queries and documents are text only
        self._model_id = model_id
        self._dim = dim or hidden
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.instruction = require_text(instruction, "instruction")
        self._eod_id = eod
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eod
        # Qwen3-Embedding's tokenizer appends <|endoftext|> itself; older snapshots did not and the
        # model card appended it by hand. Detect which, so both give the same ids.
        self._tokenizer_appends_eod = tokenizer("a")["input_ids"][-1] == eod
        self._counter = TokenCounter(tokenizer)  # for chunkers, in other threads

    @classmethod
    def load(
        cls,
        source: ModelSource,
        cfg: EmbedderSettings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path,
    ) -> "LastTokenEmbedder":
        """Load weights and tokenizer from a resolved model directory."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
            weights = causal_lm_dtype(dtype, device)
            model = AutoModel.from_pretrained(source.path, dtype=weights).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load embedder {source.name!r} from {source.path}: {exc}") from exc
        bf16_matmuls(model, dtype, device)
        return cls(
            model,
            tokenizer,
            model_id=model_identity(source, cache_dir),
            max_length=cfg.max_length,
            batch_tokens=cfg.batch_tokens,
            dim=cfg.dim,
            instruction=cfg.instruction,
        )

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def pooling(self) -> str:
        return "last_token"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids exactly as the model card's tokenizer call gives them (truncated, eod last)."""
        clipped = [clip_for_tokens(t, self.max_length) for t in texts]
        ids: list[list[int]] = self.tokenizer(
            clipped, truncation=True, max_length=self.max_length, split_special_tokens=True
        )["input_ids"]
        if not self._tokenizer_appends_eod:
            ids = [[*row[: self.max_length - 1], self._eod_id] for row in ids]
        return ids

    def document_lengths(self, documents: Sequence[str]) -> list[int]:
        return [n + (0 if self._tokenizer_appends_eod else 1) for n in self._counter.count(documents)]

    @torch.inference_mode()
    def _embed(self, texts: list[str], normalize: bool = True) -> np.ndarray:
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        device = self.model.device
        for batch in token_budget_batches([len(r) for r in ids], self.batch_tokens):
            input_ids, mask = left_pad([ids[i] for i in batch], self._pad_id, device)
            last = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, -1]
            vectors = last.float()[:, : self._dim]
            if normalize:
                vectors = F.normalize(vectors, p=2, dim=1)
            out[batch] = vectors.cpu().numpy()
        return out
