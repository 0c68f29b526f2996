"""The `Embedder` protocol and the factory that picks an implementation for a model.

Implementations: `LastTokenEmbedder` (Qwen3-Embedding semantics) and
`SentenceTransformerEmbedder` (any sentence-transformers model with its own pooling).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from twostage.retrieval.models.fingerprint import PROBES, Fingerprint
from twostage.retrieval.models.numerics import numeric_path
from twostage.retrieval.models.prompts import embedding_queries, require_texts

if TYPE_CHECKING:
    pass


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
        """The model's vectors of fixed probes (`fingerprint.py`): a remote model's identity, and for
        a local one what tells whether another numeric path stays close to the one that built an index."""
        ...

    @property
    def numerics(self) -> str:
        """The numeric path that computes the vectors: float32, bfloat16, float16, int8-dynamic,
        int8-fused, remote."""
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


class LocalModelIdentity:
    """`fingerprint` and `numerics` of an embedder whose weights are in this process."""

    model: Any  # the implementation's torch module
    _probed: Fingerprint | None = None

    def embed_documents(self, documents: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        raise NotImplementedError

    @property
    def fingerprint(self) -> Fingerprint:
        if self._probed is None:  # computed once; two threads racing compute the same value
            self._probed = Fingerprint.of(self.embed_documents(list(PROBES)))
        return self._probed

    @property
    def numerics(self) -> str:
        return numeric_path(self.model)
