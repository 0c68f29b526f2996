"""The `Embedder` protocol over a remote OpenAI-compatible `POST /v1/embeddings`.

For Qwen3-Embedding served by vLLM, TEI, Infinity or another twostage. The Qwen3 query
prompt is applied here (the server sees `Instruct: {task}\\nQuery:{query}`) and documents
are sent bare, so any server that embeds text as it is gives the model card's vectors. With
`embedder.template=server` queries leave raw, marked `input_type: query` with the instruction,
for a server that applies its own model's query prompt (another twostage, whatever it serves:
a model that takes no instruction must not be sent one).
Token counts (chunk sizes, TEI truncation) use Qwen3's vocabulary locally, exact for Qwen3
models, with the `<|endoftext|>` the model reads last. Identity: the model name the server
serves plus a fingerprint of its answers (`fingerprint.py`), probed on first use, not at
construction, so a service whose model server is down still starts and says so in
`/readyz`; probed again after each outage, since the server may come back with another model.
"""

import base64
import binascii
import threading
from collections.abc import Sequence

import numpy as np

from twostage.retrieval.models.embedder import QwenQueryPrompt
from twostage.retrieval.models.fingerprint import PROBES, Fingerprint
from twostage.retrieval.models.prompts import require_texts
from twostage.retrieval.models.remote import RemoteClient, RemoteMetrics, escape_markers
from twostage.retrieval.models.settings import EmbedderSettings
from twostage.retrieval.models.tokens import Qwen3Tokens


class RemoteEmbedder(QwenQueryPrompt):
    """Embeds through a model server; vectors are L2-normalised here (and cut to `dim`)."""

    def __init__(self, cfg: EmbedderSettings, metrics: RemoteMetrics | None = None) -> None:
        self.cfg = cfg
        self.client = RemoteClient(cfg.remote, "embedder", metrics)
        self.instruction = cfg.instruction
        self.max_length = cfg.max_length
        self._tokens = Qwen3Tokens()
        self._lock = threading.Lock()
        self._fingerprint: Fingerprint | None = None
        self._full_dim = 0
        self._probed_at_recoveries = -1

    # -- identity ------------------------------------------------------------------------------

    def _probe(self) -> Fingerprint:
        """The server's fingerprint, asked once and again after every outage it recovered from."""
        with self._lock:
            if self._fingerprint is None or self._probed_at_recoveries != self.client.breaker.recoveries:
                vectors = self._post(list(PROBES))
                self._fingerprint, self._full_dim = Fingerprint.of(_unit(vectors)), vectors.shape[1]
                self._probed_at_recoveries = self.client.breaker.recoveries
            return self._fingerprint

    @property
    def model_id(self) -> str:
        return f"remote:{self.cfg.model}"

    @property
    def fingerprint(self) -> Fingerprint:
        return self._probe()

    @property
    def dim(self) -> int:
        self._probe()
        return min(self.cfg.dim or self._full_dim, self._full_dim)

    @property
    def pooling(self) -> str:
        return "remote"

    @property
    def numerics(self) -> str:
        return "remote"  # the server's own, told apart by the fingerprint

    # -- vectors -------------------------------------------------------------------------------

    def embed_queries(
        self, queries: Sequence[str], instruction: str | None = None, *, normalize: bool = True
    ) -> np.ndarray:
        if self.cfg.template == "client":
            return super().embed_queries(queries, instruction, normalize=normalize)
        marked: dict[str, str] = {"input_type": "query"}
        if instruction is not None:
            marked["instruction"] = instruction
        return self._embed(require_texts(queries, "queries"), normalize, marked)

    def query_lengths(self, queries: Sequence[str], instruction: str | None = None) -> list[int]:
        if self.cfg.template == "client":
            return super().query_lengths(queries, instruction)
        return self.document_lengths(queries)  # the server's prompt is its own: the raw text is what we know

    def _embed(self, texts: list[str], normalize: bool, marked: dict[str, str] | None = None) -> np.ndarray:
        dim = self.dim
        if not texts:
            return np.empty((0, dim), dtype=np.float32)
        vectors = self._post(texts, marked or {})[:, :dim]
        return _unit(vectors) if normalize else vectors

    def _post(self, texts: list[str], marked: dict[str, str] | None = None) -> np.ndarray:
        """Vectors for `texts`, in calls of at most `max_batch` inputs, checked for shape."""
        step = self.cfg.remote.max_batch
        sent = [escape_markers(t) for t in texts] if self.cfg.remote.escape_markers else texts
        rows: list[np.ndarray] = []
        for start in range(0, len(sent), step):
            part = sent[start : start + step]
            body = {"model": self.cfg.model, "input": part, "encoding_format": "base64", **(marked or {})}
            answer = self.client.post("/v1/embeddings", body)
            data = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(data, list) or len(data) != len(part):
                raise self.client.bad_answer(
                    f"{len(data) if isinstance(data, list) else 'no'} embeddings for {len(part)} inputs"
                )
            try:
                ordered = sorted(data, key=lambda item: int(item["index"]))
                rows.extend(_vector(item["embedding"]) for item in ordered)
            except (KeyError, TypeError, ValueError, binascii.Error) as exc:
                raise self.client.bad_answer(f"not an OpenAI embeddings answer ({exc!r})") from None
        widths = {len(r) for r in rows}
        expected = self._full_dim or next(iter(widths))
        if widths != {expected}:
            raise self.client.bad_answer(f"vectors of {sorted(widths)} dimensions, expected {expected}")
        out = np.stack(rows).astype(np.float32, copy=False)
        if not np.all(np.isfinite(out)):
            raise self.client.bad_answer("NaN or infinite values in the vectors")
        return out

    # -- lengths -------------------------------------------------------------------------------

    def document_lengths(self, documents: Sequence[str]) -> list[int]:
        return [len(ids) + 1 for ids in self._tokens.encode_batch(list(documents))]  # + <|endoftext|>


def _vector(embedding: object) -> np.ndarray:
    """One embedding as sent: base64 of little-endian float32 (asked for: a tenth of the bytes of
    JSON floats, and no float formatting or parsing on either side), or a JSON list of floats."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4")
    if not isinstance(embedding, list):
        raise TypeError(f"an embedding is {type(embedding).__name__}")
    return np.asarray([float(x) for x in embedding], dtype=np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
