"""What the HTTP service holds while it runs: store, served deployments, micro-batchers, metrics.

Built in the app's lifespan from the settings and reached by routes through `deps.py`. Which
pair serves each collection, and the switch to a new one after a retrain or rollback, is
`retrieval.deployments.follower.ServedDeployments`'s. Model calls carry the model they are for, so a
batch never mixes a request of the old pair with the new one.
"""

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from twostage.api.runtime.jobs import JobRunner
from twostage.api.runtime.micro_batcher import MicroBatcher
from twostage.api.runtime.rate_limit import RateLimiter
from twostage.api.settings import Settings
from twostage.retrieval.access.caller import Caller, visible_filter
from twostage.retrieval.access.keys import KeyRing
from twostage.retrieval.core.errors import (
    ModelError,
    ModelOverloaded,
    TwostageError,
)
from twostage.retrieval.deployments.follower import ServedDeployments
from twostage.retrieval.models.cache import ModelCache
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.remote import RemoteMetrics
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.models.settings import RemoteSettings
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.two_stage import Deployment
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.vector_store import Filter, VectorStore
from twostage.retrieval.traffic.log import TrafficLog

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
        self.served: ServedDeployments | None = None
        self.embed_batcher: MicroBatcher[EmbedItem, np.ndarray] | None = None
        self.rerank_batcher: MicroBatcher[RerankItem, list[float]] | None = None
        self.jobs: JobRunner | None = None
        self.traffic: TrafficLog | None = None  # the search log and feedback events
        self.keys = KeyRing(settings.data_dir, [k.get_secret_value() for k in settings.api.api_keys])
        feedback = settings.feedback
        self.feedback_limiter = RateLimiter("feedback", feedback.rate_per_s, feedback.burst)
        # the one owner of loaded models, shared with an in-process retrain
        self.models = ModelCache(settings, RemoteMetrics.create(self.metrics.registry))
        self._stopping = threading.Event()
        self._canary_watch = threading.Thread(target=self._watch_canary, name="canary", daemon=True)
        for role in ("embedder", "reranker"):
            self.metrics.models_resident.labels(role).set_function(partial(self._resident, role))

    def caller(self, presented: str | None) -> Caller:
        """Who a request with bearer key `presented` (None: no key) is (`retrieval.access`)."""
        if not self.keys.any_keys():  # a local service with no key: open to reads and feedback, as always
            return Caller(None, frozenset({"search", "feedback"}), None, open=True)
        restricted = self.keys.restricted
        api, access = self.settings.api, self.settings.access
        reads = not api.keys_for_reads and not (restricted and access.anonymous == "deny")
        anonymous = Caller(
            None, frozenset({"search"}) if reads else frozenset(), frozenset() if restricted else None
        )
        return self.keys.caller(presented, anonymous)

    def visible(self, caller: Caller, user_filter: Filter | None) -> Filter | None:
        """`user_filter` with the caller's permissions ANDed in (`visible_filter`, the one place)."""
        return visible_filter(caller, user_filter, self.settings.access.default == "public")

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load models and open the store (blocking; run in a thread from the lifespan)."""
        self.store = self._given_store or open_store(self.settings)
        self.traffic = TrafficLog(self.settings.data_dir, self.settings.feedback)
        self.served = ServedDeployments(
            self.settings, self.store, self.models, self.settings.api.alias_refresh_s
        )
        self.served.load_default_pair()
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
        self.served.follow()
        self._canary_watch.start()

    def close(self) -> None:
        self._stopping.set()
        if self._canary_watch.is_alive():
            self._canary_watch.join(timeout=30)
        if self.served is not None:
            self.served.close()
        if self.jobs is not None:
            self.jobs.close(timeout_s=self.settings.api.shutdown_timeout_s)
        for batcher in (self.embed_batcher, self.rerank_batcher):
            if batcher is not None:
                batcher.close()
        if self.store is not None and self._given_store is None:
            self.store.close()
        if self.traffic is not None:
            self.traffic.close()

    def _watch_canary(self) -> None:
        """Decide the default collection's canary once its budget is spent
        (`retrieval.deployments.lifecycle.settle`)."""
        from twostage.retrieval.deployments.lifecycle import settle

        while not self._stopping.wait(self.settings.retrain.canary_check_s):
            assert self.store is not None and self.traffic is not None and self.served is not None
            try:
                said = settle(self.settings, self.store, self.traffic, self.settings.collection)
            except Exception:  # the registry or the store may be unreachable for a while: next time
                log.warning("could not check the canary", exc_info=True)
                continue
            if said is not None:
                log.info(said)
                self.served.refresh(self.settings.collection)

    def _resident(self, role: str) -> float:
        return float(sum(1 for kind, _ in self.models.loaded() if kind == role))

    @staticmethod
    def _depth(batcher: "MicroBatcher[Any, Any] | None") -> float:
        return float(batcher.depth) if batcher is not None else 0.0

    # -- deployments -----------------------------------------------------------------------

    def deployment(self, collection: str) -> Deployment:
        """The live version of `collection` with its models (`ServedDeployments.get`)."""
        assert self.served is not None
        return self.served.get(collection)

    @property
    def embedder(self) -> Embedder | None:
        """The default collection's embedder (what the compatible embedding routes serve)."""
        return self.served.embedder if self.served is not None else None

    @property
    def reranker(self) -> Reranker | None:
        """The default collection's reranker (what the compatible rerank routes serve)."""
        return self.served.reranker if self.served is not None else None

    @property
    def calibration(self) -> Calibration | None:
        """The default deployment's calibration (what the compatible rerank routes apply)."""
        return self.served.calibration if self.served is not None else None

    @property
    def load_error(self) -> str | None:
        """Why the default collection cannot be served yet, if so (/readyz)."""
        return self.served.load_error if self.served is not None else None

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

    # -- `ModelCalls` for searches, from their worker threads ---------------------------------

    def embed_query(self, embedder: Embedder, query: str, instruction: str | None) -> np.ndarray:
        """A search's query vector, batched with other requests' (blocks its worker thread)."""
        assert self.embed_batcher is not None
        return self.embed_batcher.run(EmbedItem(query, instruction, True, embedder))

    def score(
        self, reranker: Reranker, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[float]:
        """A search's rerank scores, batched with other requests' (blocks its worker thread)."""
        assert self.rerank_batcher is not None
        return self.rerank_batcher.run(
            RerankItem(query, tuple(documents), instruction, reranker), len(documents)
        )

    # -- the compatible routes' calls, from the event loop ------------------------------------

    async def embed_texts(
        self, texts: Sequence[str], instruction: str | None, as_query: bool, normalize: bool = True
    ) -> list[np.ndarray]:
        """A request's texts, admitted together (each still batched with other requests')."""
        assert self.embed_batcher is not None and self.embedder is not None
        items = [EmbedItem(t, instruction, as_query, self.embedder, normalize) for t in texts]
        return await self.embed_batcher.submit_many(items)

    async def score_documents(
        self, query: str, documents: Sequence[str], instruction: str | None
    ) -> list[float]:
        """The served reranker's scores for a rerank route's documents."""
        assert self.rerank_batcher is not None and self.reranker is not None
        item = RerankItem(query, tuple(documents), instruction, self.reranker)
        return await self.rerank_batcher.submit(item, weight=len(documents))
