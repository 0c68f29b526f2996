"""What the HTTP service holds while it runs: store, deployment, micro-batchers, metrics.

Built in the app's lifespan from the settings and reached by routes through `deps.py`.
The current `Deployment` (collection version + its embedder + reranker) is one attribute
replaced in one assignment, so every request uses one consistent pair from start to end.

After a retrain the registry's pointer (`retrieval.registry`) names a new deployment. The
service loads and warms its models in a background thread while the old deployment keeps
answering, then swaps collection, embedder and reranker together. Model calls carry the
model they are for, so a batch never mixes a request of the old pair with the new one.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.jobs import JobRunner
from api.micro_batcher import MicroBatcher
from retrieval.collections import active_manifest, open_store
from retrieval.embedder import Embedder, load_embedder
from retrieval.errors import TwostageError
from retrieval.registry import DeploymentRecord, Registry
from retrieval.reranker import Reranker, load_reranker
from retrieval.search import Deployment
from retrieval.settings import Settings
from retrieval.store import StoreError, VectorStore
from retrieval.tokens import Qwen3Tokens

log = logging.getLogger("twostage.api")
_RETRY_FAILED_LOAD_S = 30.0

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class EmbedItem:
    text: str
    instruction: str | None  # None: embed as a document (no instruction)
    as_query: bool
    embedder: Embedder


@dataclass(frozen=True)
class RerankItem:
    query: str
    documents: tuple[str, ...]
    instruction: str | None
    reranker: Reranker


def load_pair(settings: Settings, embedder: str, reranker: str) -> tuple[Embedder, Reranker]:
    """Load and warm an (embedder, reranker) pair, so its first request is not a cold one."""
    chosen = settings.model_copy(deep=True)
    chosen.embedder.model, chosen.reranker.model = embedder, reranker
    loaded_embedder, loaded_reranker = load_embedder(chosen), load_reranker(chosen)
    loaded_embedder.embed_queries(["warm up"], None)
    loaded_reranker.score("warm up", ["warm up"], None)
    return loaded_embedder, loaded_reranker


class Metrics:
    """Prometheus metrics in the app's own registry (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "twostage_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "twostage_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.stage = Histogram(
            "twostage_stage_seconds", "search stage latency", ["stage"], buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.batch_items = Histogram(
            "twostage_batch_items", "items per model batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "twostage_queue_depth", "queued model calls", ["model"], registry=self.registry
        )

    def observe_batch(self, model: str, items: int, cost: int) -> None:
        self.batch_items.labels(model).observe(items)


class Service:
    """Owns the models, the store and the batchers for one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tokens = Qwen3Tokens()
        self.store: VectorStore | None = None
        self.embedder: Embedder | None = None
        self.reranker: Reranker | None = None
        self._deployments: dict[str, Deployment] = {}
        self._checked: dict[str, float] = {}  # when each alias was last resolved (monotonic)
        self.embed_batcher: MicroBatcher[EmbedItem, np.ndarray] | None = None
        self.rerank_batcher: MicroBatcher[RerankItem, list[float]] | None = None
        self.load_error: str | None = None
        self.jobs: JobRunner | None = None
        self._records: dict[str, int] = {}  # registry deployment id behind each cached deployment
        # loaded models per (collection, deployment id): ids are only unique within a collection
        self._pairs: dict[tuple[str, int], tuple[Embedder, Reranker]] = {}
        self._loading: dict[tuple[str, int], float] = {}  # when a deployment's load started (or failed)
        self._load_lock = threading.Lock()
        # the configured (model names, loaded pair) until the first switch away from it
        self._configured: tuple[tuple[str, str], tuple[Embedder, Reranker]] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models and open the store (blocking; run in a thread from the lifespan)."""
        self.store = open_store(self.settings)
        record = Registry(self.settings).current()
        if record is not None:  # a retrained deployment: its models, not the configured ones
            self.embedder, self.reranker = load_pair(self.settings, record.embedder, record.reranker)
            self._pairs[(self.settings.collection, record.id)] = (self.embedder, self.reranker)
        else:
            self.embedder = load_embedder(self.settings)
            self.reranker = load_reranker(self.settings)
            configured = (self.settings.embedder.model, self.settings.reranker.model)
            self._configured = (configured, (self.embedder, self.reranker))
        wait = self.settings.api.batch_wait_ms / 1000
        pending = self.settings.api.max_pending
        self.embed_batcher = MicroBatcher(
            "embedder", self._embed_batch, lambda item: self.tokens.count(item.text) + 16,
            budget=self.settings.embedder.batch_tokens, max_wait_s=wait, max_pending=pending,
            on_batch=self.metrics.observe_batch,
        )  # fmt: skip
        self.rerank_batcher = MicroBatcher(
            "reranker", self._rerank_batch, lambda item: sum(len(d) for d in item.documents) // 4 + 64,
            budget=self.settings.reranker.batch_tokens, max_wait_s=wait, max_pending=pending,
            on_batch=self.metrics.observe_batch,
        )  # fmt: skip
        self.jobs = JobRunner(self)
        self.metrics.queue_depth.labels("embedder").set_function(lambda: self._depth(self.embed_batcher))
        self.metrics.queue_depth.labels("reranker").set_function(lambda: self._depth(self.rerank_batcher))
        try:
            self.deployment(self.settings.collection)
        except TwostageError as exc:  # serve anyway: /readyz says why, ingestion can create it
            self.load_error = str(exc)

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close(timeout_s=self.settings.api.shutdown_timeout_s)
        for batcher in (self.embed_batcher, self.rerank_batcher):
            if batcher is not None:
                batcher.close()
        if self.store is not None:
            self.store.close()

    @staticmethod
    def _depth(batcher: "MicroBatcher[Any, Any] | None") -> float:
        return float(batcher.depth) if batcher is not None else 0.0

    # -- deployments -----------------------------------------------------------------------

    def deployment(self, collection: str) -> Deployment:
        """The live version of `collection` with the models to use on it.

        Refuses (HTTP 409) a version built by an embedder other than the loaded one, since
        its vectors and our query vectors would not be comparable. The alias is looked up
        again at most every `api.alias_refresh_s`, so a switch is followed within that time
        without a store round trip on every request.
        """
        assert self.store is not None and self.embedder is not None
        cached = self._deployments.get(collection)
        now = time.monotonic()
        if (
            cached is not None
            and now - self._checked.get(collection, 0.0) < self.settings.api.alias_refresh_s
        ):
            return cached
        record = Registry(self.settings, collection).current()
        self._checked[collection] = now
        if record is not None:
            return self._registered(collection, record, cached)
        manifest = active_manifest(self.store, collection)
        if cached is not None and cached.manifest.collection == manifest.collection:
            return cached
        if manifest.embedder != self.embedder.model_id or manifest.dim != self.embedder.dim:
            raise StoreError(
                f"collection {manifest.collection} was built with embedder {manifest.embedder} (dim "
                f"{manifest.dim}) but this service runs {self.embedder.model_id} (dim {self.embedder.dim})"
            )
        deployment = Deployment(manifest, self.embedder, self.reranker)
        self._deployments[collection] = deployment
        if collection == self.settings.collection:
            self.load_error = None
        return deployment

    def _registered(self, collection: str, record: DeploymentRecord, cached: Deployment | None) -> Deployment:
        """The registry's deployment once its models are loaded and warm; until then the old one."""
        assert self.store is not None
        if cached is not None and self._records.get(collection) == record.id:
            return cached
        key = (collection, record.id)
        pair = self._pairs.get(key)
        if (
            pair is None
            and self._configured is not None
            and self._configured[0] == (record.embedder, record.reranker)
        ):
            pair = self._pairs[key] = self._configured[1]  # the first retrain's record of what runs
        if pair is None:
            if cached is not None:
                self._load_in_background(key, record)
                return cached
            pair = self._pairs[key] = load_pair(self.settings, record.embedder, record.reranker)
        embedder, reranker = pair
        manifest = self.store.read_manifest(record.collection)
        if manifest.embedder != embedder.model_id:
            raise StoreError(
                f"deployment d{record.id}: collection {manifest.collection} was built with "
                f"{manifest.embedder}, but its embedder {record.embedder} is {embedder.model_id}"
            )
        deployment = Deployment(manifest, embedder, reranker)
        self._deployments[collection], self._records[collection] = deployment, record.id
        if collection == self.settings.collection:
            self.embedder, self.reranker, self.load_error = embedder, reranker, None
            in_use = set(self._records.items())
            self._pairs = {k: v for k, v in self._pairs.items() if k in in_use}
            if self._configured is not None and self._configured[1] != pair:
                self._configured = None  # its memory goes with it; a rollback loads it again
        log.info("serving deployment d%s of %s: %s", record.id, collection, record.collection)
        return deployment

    def _load_in_background(self, key: tuple[str, int], record: DeploymentRecord) -> None:
        """Start loading a deployment's models once (a failed load is retried after a while)."""
        with self._load_lock:
            started = self._loading.get(key)
            if started is not None and time.monotonic() - started < _RETRY_FAILED_LOAD_S:
                return
            self._loading[key] = time.monotonic()

        def load() -> None:
            try:
                self._pairs[key] = load_pair(self.settings, record.embedder, record.reranker)
                self._loading.pop(key, None)
            except Exception:  # the old deployment keeps serving; the log says why
                log.exception("loading deployment d%s failed; still serving the previous one", record.id)

        threading.Thread(target=load, name=f"load-d{record.id}", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.store is not None and self.embedder is not None and self.reranker is not None

    # -- batched model calls ---------------------------------------------------------------

    def _embed_batch(self, items: Sequence[EmbedItem]) -> list[np.ndarray]:
        """Group by (model, kind, instruction): one call per group, results in input order."""
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple[int, bool, str | None], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((id(item.embedder), item.as_query, item.instruction), []).append(i)
        for (_, as_query, instruction), indices in groups.items():
            texts = [items[i].text for i in indices]
            embedder = items[indices[0]].embedder
            if as_query:
                vectors = embedder.embed_queries(texts, instruction)
            else:
                vectors = embedder.embed_documents(texts)
            for i, vector in zip(indices, vectors, strict=True):
                out[i] = vector
        return [v for v in out if v is not None]

    def _rerank_batch(self, items: Sequence[RerankItem]) -> list[list[float]]:
        """One `score_many` per reranker (two only while a switch is in flight), in input order."""
        out: list[list[float]] = [[] for _ in items]
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.reranker), []).append(i)
        for indices in groups.values():
            reranker = items[indices[0]].reranker
            requests = [(items[i].query, list(items[i].documents), items[i].instruction) for i in indices]
            for i, scores in zip(indices, reranker.score_many(requests), strict=True):
                out[i] = scores
        return out

    async def embed_query(
        self, text: str, instruction: str | None, embedder: Embedder | None = None
    ) -> np.ndarray:
        assert self.embed_batcher is not None and self.embedder is not None
        return await self.embed_batcher.submit(EmbedItem(text, instruction, True, embedder or self.embedder))

    async def embed_texts(
        self, texts: Sequence[str], instruction: str | None, as_query: bool
    ) -> list[np.ndarray]:
        assert self.embed_batcher is not None and self.embedder is not None
        batcher, embedder = self.embed_batcher, self.embedder
        return list(
            await asyncio.gather(
                *(batcher.submit(EmbedItem(t, instruction, as_query, embedder)) for t in texts)
            )
        )

    async def score(
        self, query: str, documents: Sequence[str], instruction: str | None, reranker: Reranker | None = None
    ) -> list[float]:
        assert self.rerank_batcher is not None and self.reranker is not None
        item = RerankItem(query, tuple(documents), instruction, reranker or self.reranker)
        return await self.rerank_batcher.submit(item)
