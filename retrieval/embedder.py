"""The `Embedder` protocol and the factory that picks an implementation for a model.

Implementations: `LastTokenEmbedder` (Qwen3-Embedding semantics) and
`SentenceTransformerEmbedder` (any sentence-transformers model with its own pooling).
"""

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from twostage.retrieval.devices import resolve_device, resolve_dtype
from twostage.retrieval.fingerprint import Fingerprint
from twostage.retrieval.model_source import ModelSource, resolve_model
from twostage.retrieval.prompts import embedding_queries, require_texts
from twostage.retrieval.settings import Settings

if TYPE_CHECKING:
    from twostage.retrieval.remote import RemoteMetrics


@runtime_checkable
class Embedder(Protocol):
    """Turns text into L2-normalised float32 vectors; queries get the task instruction."""

    @property
    def model_id(self) -> str:
        """`name@content-hash`: what a collection records to refuse vectors from another model."""
        ...

    @property
    def dim(self) -> int:
        """Length of the returned vectors (after any Matryoshka truncation)."""
        ...

    @property
    def fingerprint(self) -> Fingerprint | None:
        """A remote model's vectors of fixed probes (None for a local model: `model_id` hashes its files)."""
        ...

    @property
    def pooling(self) -> str:
        """How token states become one vector (`last_token`, `mean`, `cls`, ...), as TEI's `/info` says."""
        ...

    def embed_queries(
        self, queries: Sequence[str], instruction: str | None = None, *, normalize: bool = True
    ) -> np.ndarray:
        """Vectors of search queries, shape (len(queries), dim), in input order.

        `normalize=False` returns the pooled vectors as the model gives them (TEI's `/embed`
        offers it; a model that normalises inside, like all-MiniLM-L6-v2 with its Normalize
        module, gives unit vectors either way); search always uses the normalised ones.
        """
        ...

    def embed_documents(self, documents: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """Vectors of documents (no instruction), shape (len(documents), dim), in input order."""
        ...

    @property
    def max_length(self) -> int:
        """Tokens the model reads of one input; the rest is cut off (so chunks must fit in it)."""
        ...

    def document_lengths(self, documents: Sequence[str]) -> list[int]:
        """Tokens each document takes in the model's input, untruncated, special tokens included."""
        ...

    def query_lengths(self, queries: Sequence[str], instruction: str | None = None) -> list[int]:
        """Tokens each query takes in the model's input with its prompt, untruncated."""
        ...


class QwenQueryPrompt:
    """Qwen3-Embedding's query side for any implementation that embeds text as it is given.

    Queries become `Instruct: {task}\nQuery:{query}` (the call's instruction, else the default
    task), documents are embedded bare; lengths are those of the prompted text. Implementations
    provide `_embed` and `document_lengths`.
    """

    instruction: str

    def _embed(self, texts: list[str], normalize: bool) -> np.ndarray:
        raise NotImplementedError

    def document_lengths(self, documents: Sequence[str]) -> list[int]:
        raise NotImplementedError

    def embed_queries(
        self, queries: Sequence[str], instruction: str | None = None, *, normalize: bool = True
    ) -> np.ndarray:
        return self._embed(embedding_queries(queries, instruction, self.instruction), normalize)

    def embed_documents(self, documents: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        return self._embed(require_texts(documents, "documents"), normalize)

    def query_lengths(self, queries: Sequence[str], instruction: str | None = None) -> list[int]:
        return self.document_lengths(embedding_queries(queries, instruction, self.instruction))


def detect_embedder_family(source: ModelSource) -> str:
    """`last-token` for Qwen-style decoder embedders, else `sentence-transformers`."""
    pooling = source.path / "1_Pooling" / "config.json"
    if pooling.exists() and json.loads(pooling.read_text()).get("pooling_mode_lasttoken"):
        return "last-token"
    config = json.loads((source.path / "config.json").read_text())
    return "last-token" if config.get("model_type") in {"qwen3", "qwen2"} else "sentence-transformers"


def load_embedder(settings: Settings, remote_metrics: "RemoteMetrics | None" = None) -> Embedder:
    """Resolve, load and warm the configured embedder (the only place that picks the family)."""
    cfg = settings.embedder
    if cfg.backend == "remote":
        from twostage.retrieval.remote_embedder import RemoteEmbedder

        return RemoteEmbedder(cfg, remote_metrics)
    source = resolve_model(cfg.model, cache_dir=settings.cache_dir, revision=cfg.revision)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    family = detect_embedder_family(source) if cfg.family == "auto" else cfg.family
    if family == "last-token":
        from twostage.retrieval.last_token_embedder import LastTokenEmbedder

        return LastTokenEmbedder.load(source, cfg, device=device, dtype=dtype, cache_dir=settings.cache_dir)
    from twostage.retrieval.st_embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder.load(
        source, cfg, device=device, dtype=dtype, cache_dir=settings.cache_dir
    )
