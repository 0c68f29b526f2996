"""The serving side of deployments: the pair a process serves for each collection, loaded in the
background and swapped in one assignment when the registry's pointer moves (`ServedDeployments`),
and the one-off load a CLI search uses (`load_served`). It only reads the registry; changing what
is served is `lifecycle.py`'s."""

import logging
import threading
import time
from dataclasses import replace

from twostage.retrieval.core.errors import ModelLoading, RemoteUnavailable, TwostageError
from twostage.retrieval.deployments.registry import RETRY_FAILED_LOAD_S, Canary, DeploymentRecord, Registry
from twostage.retrieval.models.cache import ModelCache, pair_keys
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.settings import QuerySettings
from twostage.retrieval.search.trust import judge_reranker
from twostage.retrieval.search.two_stage import Deployment
from twostage.retrieval.store.collections import active_manifest, embedder_mismatch
from twostage.retrieval.store.vector_store import (
    CollectionManifest,
    CollectionNotFound,
    StoreError,
    VectorStore,
)

log = logging.getLogger(__name__)


def check_built_by(
    manifest: CollectionManifest, embedder: Embedder, settings: QuerySettings, label: str
) -> None:
    """Refuse (409) an index built by another embedder: its vectors and ours are not comparable."""
    mismatch = embedder_mismatch(manifest, embedder, settings.numerics.embedder_min_cosine)
    if mismatch is not None:
        raise StoreError(f"{label}{mismatch}")


def load_served(
    settings: QuerySettings, store: VectorStore, collection: str, *, reranker: bool = True
) -> Deployment:
    """The deployment `collection` serves, with its models loaded in this thread: the registry's
    record, else the live alias with the configured models. For a one-off search (`twostage
    search`): `reranker=False` loads none (a search that will not rerank)."""
    record = Registry(settings, collection, store).current()
    if record is not None:
        manifest, names = store.read_manifest(record.collection), (record.embedder, record.reranker)
    else:
        manifest = active_manifest(store, collection)  # no index: said before any model loads
        names = (settings.embedder.model, settings.reranker.model)
    models = ModelCache(settings)
    embedder = models.embedder(names[0])
    check_built_by(
        manifest, embedder, settings, f"deployment d{record.id} ({record.embedder}): " if record else ""
    )
    served = models.reranker(names[1]) if reranker else None
    trust = judge_reranker(served, record.metrics) if served is not None and record is not None else None
    return Deployment(
        manifest,
        embedder,
        served,
        trust,
        record.calibration if record else None,
        record.id if record else None,
    )


def warm_pair(models: ModelCache, names: tuple[str, str]) -> tuple[Embedder, Reranker]:
    """An (embedder, reranker) pair from the cache, warmed so its first request is not a cold one."""
    embedder, reranker = models.pair(*names)
    try:
        embedder.embed_queries(["warm up"], None)
        reranker.score("warm up", ["warm up"], None)
    except RemoteUnavailable as exc:  # a model server that is down: serve anyway, /readyz says why
        log.warning("could not warm up: %s", exc)
    return embedder, reranker


class ServedDeployments:
    """What a long-running service serves for each collection, and the switch to a new pair.

    The current `Deployment` of a collection (version + its embedder + reranker) is one entry
    replaced in one assignment, so every request uses one consistent pair from start to end.
    After a retrain the registry's pointer names a new deployment: its models load and warm in a
    background thread while the old deployment keeps answering, then collection, embedder and
    reranker are swapped together. This object is their one owner: the deployments, records and
    loaded pairs change together under `_state_lock` (requests only read), and a refresher
    thread follows switches (retrain, rollback, `ingest --new-version`).
    """

    def __init__(
        self, settings: QuerySettings, store: VectorStore, models: ModelCache, refresh_s: float
    ) -> None:
        self.settings, self.store, self.models = settings, store, models
        self.refresh_s = refresh_s  # how often the registry pointer and the aliases are re-read
        self.embedder: Embedder | None = None  # the default collection's pair (the compatible routes')
        self.reranker: Reranker | None = None
        self.load_error: str | None = None  # why the default collection cannot be served (/readyz)
        self.calibration: Calibration | None = None  # the default deployment's (the rerank routes')
        self._deployments: dict[str, Deployment] = {}
        self._records: dict[str, int] = {}  # registry deployment id behind each cached deployment
        self._canaries: dict[str, tuple[Canary, Deployment]] = {}  # loaded canaries, by collection
        # the (embedder, reranker) names of each (collection, deployment id) whose models are loaded
        self._pairs: dict[tuple[str, int], tuple[str, str]] = {}
        self._loading: dict[tuple[str, int], float] = {}  # when a deployment's load started (or failed)
        self._load_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._stopping = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, name="deployments", daemon=True)

    def load_default_pair(self) -> None:
        """Load (blocking) the pair the default collection serves: its registered deployment's, else
        the configured models."""
        try:
            record = Registry(self.settings, store=self.store).current()
        except TwostageError as exc:  # a server-mode registry lives in Qdrant, which may be down: serve
            record, self.load_error = None, str(exc)  # anyway with the configured models; /readyz says why
        if record is not None:  # a retrained deployment: its models, not the configured ones
            names, self.calibration = (record.embedder, record.reranker), record.calibration
            self._pairs[(self.settings.collection, record.id)] = names
        else:
            names = (self.settings.embedder.model, self.settings.reranker.model)
        self.embedder, self.reranker = warm_pair(self.models, names)

    def follow(self) -> None:
        """Resolve the default collection now (a failure is kept in `load_error`), then follow switches."""
        try:
            self.get(self.settings.collection)
        except TwostageError as exc:  # serve anyway: /readyz says why, ingestion can create it
            self.load_error = str(exc)
        self._refresher.start()

    def close(self) -> None:
        self._stopping.set()
        if self._refresher.is_alive():
            self._refresher.join(timeout=30)

    def get(self, collection: str) -> Deployment:
        """The live version of `collection` with the models to use on it.

        Answered from memory: the refresher re-resolves every collection in use each
        `api.alias_refresh_s`, so requests never wait on the registry or the store to follow a
        switch. Only the first request for a collection resolves it, in the request's worker
        thread (never on the event loop). Refuses (HTTP 409) a version built by an embedder other
        than the loaded one, since its vectors and our query vectors would not be comparable.
        """
        cached = self._deployments.get(collection)
        if cached is not None:
            return cached
        with self._state_lock:
            return self._deployments.get(collection) or self._resolve(collection)

    def canary(self, collection: str) -> tuple[Canary, Deployment] | None:
        """The canary `collection` serves beside its deployment, once its models are loaded."""
        return self._canaries.get(collection)

    def refresh(self, collection: str) -> Deployment:
        """Resolve `collection` now rather than at the refresher's next turn (after a change this
        process made itself, such as a refitted calibration)."""
        with self._state_lock:
            return self._resolve(collection)

    def _resolve(self, collection: str) -> Deployment:
        """Look the deployment up in the registry and the store (with `_state_lock` held)."""
        assert self.embedder is not None
        cached = self._deployments.get(collection)
        registry = Registry(self.settings, collection, self.store)
        record = registry.current()
        if record is not None:
            deployment = self._registered(collection, record, cached)
            self._follow_canary(collection, registry, registry.canary(), deployment)
            return deployment
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
        while not self._stopping.wait(self.refresh_s or 0.05):
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
        if cached is not None and self._records.get(collection) == record.id:
            if cached.calibration != record.calibration:  # refitted (`twostage calibrate`): same models
                cached = replace(cached, calibration=record.calibration)
                self._deployments[collection] = cached
                if collection == self.settings.collection:
                    self.calibration = record.calibration
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
        check_built_by(manifest, embedder, self.settings, f"deployment d{record.id} ({record.embedder}): ")
        trust = judge_reranker(reranker, record.metrics)
        deployment = Deployment(manifest, embedder, reranker, trust, record.calibration, record.id)
        self._deployments[collection], self._records[collection] = deployment, record.id
        if collection == self.settings.collection:
            self.embedder, self.reranker, self.load_error = embedder, reranker, None
            self.calibration = record.calibration
            canaries = {(c, held[0].deployment) for c, held in self._canaries.items()}
            in_use = set(self._records.items()) | canaries
            self._pairs = {k: v for k, v in self._pairs.items() if k in in_use}
            # the old pair's memory goes with its last request; a rollback loads it again
            self.models.keep_only(pair_keys(self._pairs.values()))
        log.info("serving deployment d%s of %s: %s", record.id, collection, record.collection)
        return deployment

    def _follow_canary(
        self, collection: str, registry: Registry, canary: Canary | None, control: Deployment
    ) -> None:
        """Serve the registry's canary beside `control` once its models are loaded (with `_state_lock`)."""
        held = self._canaries.get(collection)
        if canary is None or canary.control != control.record:  # none, or decided and switched since
            if held is not None:
                del self._canaries[collection]
                log.info("canary d%s of %s ended", held[0].deployment, collection)
            return
        if held is not None and held[0] == canary:
            return
        record = registry.get(canary.deployment)
        key, names = (collection, record.id), (record.embedder, record.reranker)
        if key not in self._pairs and not pair_keys([names]) <= self.models.loaded():
            self._load_in_background(key, record)  # served once loaded; the control meanwhile
            return
        self._pairs[key] = names
        embedder, reranker = self.models.pair(*names)
        manifest = self.store.read_manifest(record.collection)
        check_built_by(manifest, embedder, self.settings, f"canary d{record.id} ({record.embedder}): ")
        trust = judge_reranker(reranker, record.metrics)
        self._canaries[collection] = (canary, Deployment(manifest, embedder, reranker, trust,
                                                         record.calibration, record.id))  # fmt: skip
        how = " (interleaved)" if canary.interleave else ""
        log.info(
            "serving canary d%s of %s to %.0f%% of sessions%s", record.id, collection, 100 * canary.share, how
        )

    def _load_in_background(self, key: tuple[str, int], record: DeploymentRecord) -> None:
        """Start loading a deployment's models once (a failed load is retried after a while)."""
        with self._load_lock:
            started = self._loading.get(key)
            if started is not None and time.monotonic() - started < RETRY_FAILED_LOAD_S:
                return
            self._loading[key] = time.monotonic()

        def load() -> None:
            try:
                names = (record.embedder, record.reranker)
                warm_pair(self.models, names)
                with self._state_lock:  # the refresher (or the next request) swaps it in
                    self._pairs[key] = names
                    self._loading.pop(key, None)
            except Exception:  # the old deployment keeps serving; the log says why
                log.exception("loading deployment d%s failed; still serving the previous one", record.id)

        threading.Thread(target=load, name=f"load-d{record.id}", daemon=True).start()
