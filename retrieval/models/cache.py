"""One owner of loaded models: a cache keyed by (role, model), shared by the service and an
in-process retrain.

Without it a retrain inside the server loaded the deployed pair again (to evaluate it, and
again to verify through the index) next to the pair already serving, and the service then
loaded the promoted pair a third time; with 4B/8B models on one GPU that ends in
out-of-memory. Here each model is loaded once: the first caller loads it behind a future and
concurrent callers wait on that future instead of loading a second copy; entries are dropped
with `keep_only` (the service, after a switch) or `release` (a retrain's rejected candidate),
after which the memory goes as soon as the last request using the old model finishes.
"""

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Literal, cast

from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.remote import RemoteMetrics
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.models.settings import ModelSettings

Role = Literal["embedder", "reranker"]
Key = tuple[Role, str]


def pair_keys(pairs: Iterable[tuple[str, str]]) -> set[Key]:
    """The cache keys of (embedder, reranker) name pairs."""
    keys: set[Key] = set()
    for embedder, reranker in pairs:
        keys |= {("embedder", embedder), ("reranker", reranker)}
    return keys


class ModelCache:
    """Loaded embedders and rerankers by (role, model name as configured), one load each."""

    def __init__(self, settings: ModelSettings, remote_metrics: RemoteMetrics | None = None) -> None:
        self.settings = settings
        self.remote_metrics = remote_metrics  # remote backends report latency and errors here
        self._lock = threading.Lock()
        self._entries: dict[Key, Future[Embedder | Reranker]] = {}

    def embedder(self, model: str) -> Embedder:
        return cast(Embedder, self._get(("embedder", model)))

    def reranker(self, model: str) -> Reranker:
        return cast(Reranker, self._get(("reranker", model)))

    def pair(self, embedder: str, reranker: str) -> tuple[Embedder, Reranker]:
        return self.embedder(embedder), self.reranker(reranker)

    def loaded(self) -> set[Key]:
        """What is loaded now (not what is still loading): asking for these never waits."""
        with self._lock:
            return {k for k, f in self._entries.items() if f.done() and f.exception() is None}

    def release(self, *keys: Key) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def keep_only(self, keys: set[Key]) -> None:
        """Drop every model not in `keys` (the service keeps the pairs it serves)."""
        with self._lock:
            for key in set(self._entries) - keys:
                del self._entries[key]

    def _get(self, key: Key) -> Embedder | Reranker:
        with self._lock:
            future = self._entries.get(key)
            loads = future is None
            if future is None:
                future = self._entries[key] = Future()
        if loads:
            try:
                future.set_result(self._load(key))
            except BaseException as exc:
                with self._lock:
                    self._entries.pop(key, None)  # a later call tries again
                future.set_exception(exc)
        return future.result()

    def _load(self, key: Key) -> Embedder | Reranker:
        role, model = key
        chosen = self.settings.model_copy(deep=True)
        if role == "embedder":
            chosen.embedder.model = model
            return load_embedder(chosen, self.remote_metrics)
        chosen.reranker.model = model
        return load_reranker(chosen, self.remote_metrics)
