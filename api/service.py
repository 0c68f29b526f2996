"""What the HTTP service holds while it runs: store, deployment, micro-batchers, metrics.

Built in the app's lifespan from the settings and reached by routes through `deps.py`.
The current `Deployment` (collection version + its embedder + reranker) is one attribute
replaced in one assignment, so every request uses one consistent pair from start to end.

After a retrain the registry's pointer (`retrieval.registry`) names a new deployment. The
service loads and warms its models in a background thread while the old deployment keeps
answering, then swaps collection, embedder and reranker together. Model calls carry the
model they are for, so a batch never mixes a request of the old pair with the new one.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from twostage.api.jobs import JobRunner
from twostage.api.micro_batcher import MicroBatcher
from twostage.retrieval.collections import active_manifest, embedder_mismatch, open_store
from twostage.retrieval.embedder import Embedder
from twostage.retrieval.errors import (
    ModelError,
    ModelLoading,
    ModelOverloaded,
    RemoteUnavailable,
    TwostageError,
)
from twostage.retrieval.model_cache import ModelCache, pair_keys
from twostage.retrieval.registry import DeploymentRecord, Registry
from twostage.retrieval.remote import RemoteMetrics
from twostage.retrieval.reranker import Reranker
from twostage.retrieval.search import Deployment
from twostage.retrieval.settings import RemoteSettings, Settings
from twostage.retrieval.store import CollectionNotFound, StoreError, VectorStore
from twostage.retrieval.tokens import Qwen3Tokens
from twostage.retrieval.trust import judge_reranker

log = logging.getLogger("twostage.api")
T = TypeVar("T", bound=Iterable[Any])
_RETRY_FAILED_LOAD_S = 30.0

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class EmbedItem:
    text: str
    instruction: str | None  # None: embed as a document (no instruction)
    as_query: bool
    embedder: Embedder
    normalize: bool = True


@dataclass(frozen=True)
class RerankItem:
    query: str
    documents: tuple[str, ...]
    instruction: str | None
    reranker: Reranker


def _workers(backend: str, remote: RemoteSettings) -> int:
    """Batcher workers for a model: one in this process (a forward pass uses every core); for
    a model server, enough batches in flight to cover the HTTP round trip."""
    return remote.concurrency if backend == "remote" else 1


def load_pair(models: ModelCache, names: tuple[str, str]) -> tuple[Embedder, Reranker]:
    """An (embedder, reranker) pair from the cache, warmed so its first request is not a cold one."""
    embedder, reranker = models.pair(*names)
    try:
        embedder.embed_queries(["warm up"], None)
        reranker.score("warm up", ["warm up"], None)
    except RemoteUnavailable as exc:  # a model server that is down: serve anyway, /readyz says why
        log.warning("could not warm up: %s", exc)
    return embedder, reranker


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
        self.model_errors = Counter(
            "twostage_model_errors_total",
            "model calls that failed",
            ["model", "kind"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "twostage_queue_depth", "queued model calls", ["model"], registry=self.registry
        )
        self.models_resident = Gauge(
            "twostage_models_resident", "models loaded in the model cache (serving, a retrain's)", ["role"],
            registry=self.registry,
        )  # fmt: skip

    def observe_batch(self, model: str, items: int, cost: int) -> None:
        self.batch_items.labels(model).observe(items)


class Service:
    """Owns the models, the store and the batchers for one process."""

    def __init__(self, settings: Settings, store: VectorStore | None = None) -> None:
        """`store`: one already open, shared with other services in this process (replicas in a
        test share one qdrant-client local-mode store, which one process alone may open); it is
        then left open at `close`. By default the service opens its own at `start`."""
        self.settings = settings
        self.metrics = Metrics()
        self.tokens = Qwen3Tokens()
        self.store: VectorStore | None = None
        self._given_store = store
        self.embedder: Embedder | None = None
        self.reranker: Reranker | None = None
        self._deployments: dict[str, Deployment] = {}
        self.embed_batcher: MicroBatcher[EmbedItem, np.ndarray] | None = None
        self.rerank_batcher: MicroBatcher[RerankItem, list[float]] | None = None
        self.load_error: str | None = None
        self.jobs: JobRunner | None = None
        self._records: dict[str, int] = {}  # registry deployment id behind each cached deployment
        # the one owner of loaded models, shared with an in-process retrain
        self.models = ModelCache(settings, RemoteMetrics.create(self.metrics.registry))
        for role in ("embedder", "reranker"):
            self.metrics.models_resident.labels(role).set_function(partial(self._resident, role))
        # the (embedder, reranker) names of each (collection, deployment id) whose models are loaded
        self._pairs: dict[tuple[str, int], tuple[str, str]] = {}
        self._loading: dict[tuple[str, int], float] = {}  # when a deployment's load started (or failed)
        self._load_lock = threading.Lock()
        # deployments, records and loaded pairs change together, under this lock (requests only read)
        self._state_lock = threading.RLock()
        self._stopping = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, name="deployments", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models and open the store (blocking; run in a thread from the lifespan)."""
        self.store = self._given_store or open_store(self.settings)
        try:
            record = Registry(self.settings, store=self.store).current()
        except TwostageError as exc:  # a server-mode registry lives in Qdrant, which may be down: serve
            record, self.load_error = None, str(exc)  # anyway with the configured models; /readyz says why
        if record is not None:  # a retrained deployment: its models, not the configured ones
            names = (record.embedder, record.reranker)
            self._pairs[(self.settings.collection, record.id)] = names
        else:
            names = (self.settings.embedder.model, self.settings.reranker.model)
        self.embedder, self.reranker = load_pair(self.models, names)
        wait = self.settings.api.batch_wait_ms / 1000
        pending = self.settings.api.max_pending
        self.embed_batcher = MicroBatcher(
            "embedder", self._embed_batch, lambda item: self.tokens.count(item.text) + 16,
            budget=self.settings.embedder.batch_tokens, max_wait_s=wait, max_pending=pending,
            on_batch=self.metrics.observe_batch, max_items=None if self.settings.api.micro_batching else 1,
            workers=_workers(self.settings.embedder.backend, self.settings.embedder.remote),
        )  # fmt: skip
        self.rerank_batcher = MicroBatcher(
            "reranker", self._rerank_batch, lambda item: sum(len(d) for d in item.documents) // 4 + 64,
            budget=self.settings.reranker.batch_tokens, max_wait_s=wait, max_pending=pending,
            on_batch=self.metrics.observe_batch, max_items=None if self.settings.api.micro_batching else 1,
            workers=_workers(self.settings.reranker.backend, self.settings.reranker.remote),
        )  # fmt: skip
        self.jobs = JobRunner(self)
        self.metrics.queue_depth.labels("embedder").set_function(lambda: self._depth(self.embed_batcher))
        self.metrics.queue_depth.labels("reranker").set_function(lambda: self._depth(self.rerank_batcher))
        try:
            self.deployment(self.settings.collection)
        except TwostageError as exc:  # serve anyway: /readyz says why, ingestion can create it
            self.load_error = str(exc)
        self._refresher.start()

    def close(self) -> None:
        self._stopping.set()
        if self._refresher.is_alive():
            self._refresher.join(timeout=30)
        if self.jobs is not None:
            self.jobs.close(timeout_s=self.settings.api.shutdown_timeout_s)
        for batcher in (self.embed_batcher, self.rerank_batcher):
            if batcher is not None:
                batcher.close()
        if self.store is not None and self._given_store is None:
            self.store.close()

    def _resident(self, role: str) -> float:
        return float(sum(1 for kind, _ in self.models.loaded() if kind == role))

    @staticmethod
    def _depth(batcher: "MicroBatcher[Any, Any] | None") -> float:
        return float(batcher.depth) if batcher is not None else 0.0

    # -- deployments -----------------------------------------------------------------------

    def deployment(self, collection: str) -> Deployment:
        """The live version of `collection` with the models to use on it.

        Answered from memory: a background refresher re-resolves every collection in use
        each `api.alias_refresh_s`, so requests never wait on the registry or the store to
        follow a switch. Only the first request for a collection resolves it, in the
        request's worker thread (never on the event loop). Refuses (HTTP 409) a version
        built by an embedder other than the loaded one, since its vectors and our query
        vectors would not be comparable.
        """
        cached = self._deployments.get(collection)
        if cached is not None:
            return cached
        with self._state_lock:
            return self._deployments.get(collection) or self._resolve(collection)

    def _resolve(self, collection: str) -> Deployment:
        """Look the deployment up in the registry and the store (with `_state_lock` held)."""
        assert self.store is not None and self.embedder is not None
        cached = self._deployments.get(collection)
        record = Registry(self.settings, collection, self.store).current()
        if record is not None:
            return self._registered(collection, record, cached)
        manifest = active_manifest(self.store, collection)
        if cached is not None and cached.manifest.collection == manifest.collection:
            return cached
        mismatch = embedder_mismatch(manifest, self.embedder, self.settings.numerics.embedder_min_cosine)
        if mismatch is not None:
            raise StoreError(f"{mismatch}, which this service runs")
        deployment = Deployment(manifest, self.embedder, self.reranker)
        self._deployments[collection] = deployment
        if collection == self.settings.collection:
            self.load_error = None
        return deployment

    def _refresh(self) -> None:
        """Follow switches (retrain, rollback, `ingest --new-version`) for every collection in use."""
        while not self._stopping.wait(self.settings.api.alias_refresh_s or 0.05):
            for collection in list(self._deployments):
                try:
                    with self._state_lock:
                        self._resolve(collection)
                except CollectionNotFound:
                    self._deployments.pop(collection, None)  # deleted: the next request says so
                except Exception:  # the store may be unreachable for a while: keep serving what we have
                    log.warning("could not refresh the deployment of %s", collection, exc_info=True)

    def _registered(self, collection: str, record: DeploymentRecord, cached: Deployment | None) -> Deployment:
        """The registry's deployment once its models are loaded and warm; until then the old one."""
        assert self.store is not None
        if cached is not None and self._records.get(collection) == record.id:
            return cached
        key, names = (collection, record.id), (record.embedder, record.reranker)
        if key not in self._pairs and not pair_keys([names]) <= self.models.loaded():
            # never loaded in a request: in the background, the old pair answering meanwhile
            self._load_in_background(key, record)
            if cached is not None:
                return cached
            raise ModelLoading(f"the models of deployment d{record.id} of {collection!r} are loading")
        self._pairs[key] = names
        embedder, reranker = self.models.pair(*names)  # loaded: no wait
        manifest = self.store.read_manifest(record.collection)
        mismatch = embedder_mismatch(manifest, embedder, self.settings.numerics.embedder_min_cosine)
        if mismatch is not None:
            raise StoreError(f"deployment d{record.id} ({record.embedder}): {mismatch}")
        deployment = Deployment(manifest, embedder, reranker, judge_reranker(reranker, record.metrics))
        self._deployments[collection], self._records[collection] = deployment, record.id
        if collection == self.settings.collection:
            self.embedder, self.reranker, self.load_error = embedder, reranker, None
            in_use = set(self._records.items())
            self._pairs = {k: v for k, v in self._pairs.items() if k in in_use}
            # the old pair's memory goes with its last request; a rollback loads it again
            self.models.keep_only(pair_keys(self._pairs.values()))
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
                names = (record.embedder, record.reranker)
                load_pair(self.models, names)
                with self._state_lock:  # the refresher (or the next request) swaps it in
                    self._pairs[key] = names
                    self._loading.pop(key, None)
            except Exception:  # the old deployment keeps serving; the log says why
                log.exception("loading deployment d%s failed; still serving the previous one", record.id)

        threading.Thread(target=load, name=f"load-d{record.id}", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.store is not None and self.embedder is not None and self.reranker is not None

    # -- batched model calls ---------------------------------------------------------------

    def _embed_batch(self, items: Sequence[EmbedItem]) -> list[np.ndarray]:
        """Group by (model, kind, instruction, normalisation): one call per group, results in input order."""
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[tuple[int, bool, str | None, bool], list[int]] = {}
        for i, item in enumerate(items):
            key = (id(item.embedder), item.as_query, item.instruction, item.normalize)
            groups.setdefault(key, []).append(i)
        for (_, as_query, instruction, normalize), indices in groups.items():
            texts = [items[i].text for i in indices]
            embedder = items[indices[0]].embedder
            call = (
                partial(embedder.embed_queries, texts, instruction, normalize=normalize)
                if as_query
                else partial(embedder.embed_documents, texts, normalize=normalize)
            )
            vectors = self._run_model("embedder", embedder.model_id, call)
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
            answers = self._run_model("reranker", reranker.model_id, partial(reranker.score_many, requests))
            for i, scores in zip(indices, answers, strict=True):
                out[i] = scores
        return out

    def _run_model(self, role: str, model_id: str, call: Callable[[], T]) -> T:
        """A batch's model call; what goes wrong reaches its requests as a message and a metric.

        Out of device memory is `ModelOverloaded` (503 + Retry-After: the batch may fit later,
        and the batcher retries its items one by one first); any other failure, or NaN or
        infinite output, is `ModelError` (500 with the model named; the traceback is logged).
        """
        import torch

        try:
            result = call()
        except TwostageError:
            raise  # the caller's input (too long, empty): a 4xx with its own message
        except torch.OutOfMemoryError as exc:
            self.metrics.model_errors.labels(role, "out_of_memory").inc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ModelOverloaded(
                f"{role} {model_id} ran out of device memory on this batch; retry shortly "
                f"(or lower TWOSTAGE_{role.upper()}__BATCH_TOKENS)"
            ) from exc
        except Exception as exc:
            self.metrics.model_errors.labels(role, "error").inc()
            log.exception("%s %s failed on a batch", role, model_id)
            raise ModelError(f"{role} {model_id} failed: {type(exc).__name__}: {exc}"[:500]) from exc
        if not all(np.all(np.isfinite(np.asarray(row, dtype=np.float64))) for row in result):
            self.metrics.model_errors.labels(role, "non_finite").inc()
            raise ModelError(
                f"{role} {model_id} returned NaN or infinite values: the model or its weights are broken "
                "(or its dtype overflows); check it with twostage models check"
            )
        return result

    async def embed_query(
        self, text: str, instruction: str | None, embedder: Embedder | None = None
    ) -> np.ndarray:
        assert self.embed_batcher is not None and self.embedder is not None
        return await self.embed_batcher.submit(EmbedItem(text, instruction, True, embedder or self.embedder))

    async def embed_texts(
        self, texts: Sequence[str], instruction: str | None, as_query: bool, normalize: bool = True
    ) -> list[np.ndarray]:
        """A request's texts, admitted together (each still batched with other requests')."""
        assert self.embed_batcher is not None and self.embedder is not None
        items = [EmbedItem(t, instruction, as_query, self.embedder, normalize) for t in texts]
        return await self.embed_batcher.submit_many(items)

    async def score(
        self, query: str, documents: Sequence[str], instruction: str | None, reranker: Reranker | None = None
    ) -> list[float]:
        assert self.rerank_batcher is not None and self.reranker is not None
        item = RerankItem(query, tuple(documents), instruction, reranker or self.reranker)
        return await self.rerank_batcher.submit(item, weight=len(documents))
