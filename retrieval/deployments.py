"""The model registry: which (collection version, embedder, reranker) is deployed, and history.

A directory per collection name, no server:

    DATA/registry/NAME/deployments/dN.json   one record per deployment (rewritten only to refit
                                             its calibration: `twostage calibrate`)
    DATA/registry/NAME/models/dN/embedder    merged models of deployment N (when it trained them)
    DATA/registry/NAME/models/dN/reranker
    DATA/registry/NAME/current.json          {"deployment": N}: the one pointer the API follows
    DATA/registry/NAME/runs/RUN/             each retrain's manifest, report.json, report.png
    DATA/registry/NAME/retrain.lock          flock + pid: one retrain at a time

The pointer names the collection version and both models together, so switching it (one
atomic rename) moves all three at once; the store's alias is moved right after it for
clients that read Qdrant directly. Without a registry the deployment is the alias plus the
configured models, exactly as before the first retrain.

In server mode (`store.kind = qdrant`) the records, the current pointer and the pending
marker live in Qdrant itself (`QdrantRegistryBackend`: a small `twostage_registry`
collection, one point per key), so every API replica on that cluster follows a switch
within `api.alias_refresh_s`; models, runs and the lock stay under the data directory, whose
promoted model directories are recorded by absolute path: on shared storage mounted at the
same path, every replica loads them.
"""

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from twostage.retrieval.errors import InputError, ModelLoading, RemoteUnavailable, TwostageError
from twostage.retrieval.models.cache import ModelCache, pair_keys
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.trust import judge_reranker
from twostage.retrieval.search.two_stage import Deployment
from twostage.retrieval.settings import Settings
from twostage.retrieval.store.collections import active_manifest, embedder_mismatch
from twostage.retrieval.store.locks import PidLock, write_json_atomic
from twostage.retrieval.store.vector_store import (
    CollectionManifest,
    CollectionNotFound,
    StoreError,
    VectorStore,
    now_iso,
)

log = logging.getLogger(__name__)
RETRY_FAILED_LOAD_S = 30.0

Say = Callable[[str], None]


class DeploymentRecord(BaseModel):
    """One deployed (collection version, embedder, reranker) and how it came to be."""

    id: int
    collection: str = Field(description="the versioned collection, NAME__vN")
    embedder: str = Field(description="model as configured: a path, hub id or pypi:NAME")
    embedder_id: str = Field(description="model identity name@content-hash that built the collection")
    reranker: str
    parent: int | None = None
    run: str | None = Field(None, description="the retrain run that produced it (None: bootstrap)")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict, description="the gate's decisions and why")
    calibration: Calibration | None = Field(
        None, description="served score -> P(relevant), fitted on judged dev queries (None: uncalibrated)"
    )
    comparison: dict[str, Any] = Field(
        default_factory=dict,
        description="per-query gate metric of this deployment and its parent on the dev set",
    )
    created_at: str = Field(default_factory=now_iso)


class Canary(BaseModel):
    """A candidate deployment served to a share of the traffic before anyone decides to switch:
    `share` of sessions (stable per session, else per search) get the candidate's ranking, or
    with `interleave` that share get both rankings merged by team-draft interleaving. The
    service's canary watcher decides from the feedback once a budget is spent
    (`retrieval.traffic.canary`)."""

    deployment: int = Field(description="the candidate (a recorded deployment, not current)")
    control: int = Field(description="the current deployment when the canary began")
    share: float = Field(gt=0, le=1)
    interleave: bool = False
    started_at: str = Field(default_factory=now_iso)
    started_ts: float = Field(default_factory=time.time)
    max_events: int = Field(ge=1, description="decide once this many positive events came in")
    max_seconds: float = Field(gt=0, description="decide after this long, whatever came in")
    alpha: float = Field(gt=0, lt=1, description="significance level of the decision's test")


class RegistryBackend(Protocol):
    """Where records and pointers live: JSON documents by key (`current`, `pending`, `deployments/dN`)."""

    def read(self, key: str) -> dict[str, Any] | None: ...

    def write(self, key: str, value: dict[str, Any]) -> None:
        """Replace the document at `key` atomically."""
        ...

    def delete(self, key: str) -> None: ...

    def keys(self, folder: str) -> list[str]:
        """The keys under `folder/`."""
        ...


class FileRegistryBackend:
    """`ROOT/KEY.json`, written by atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write(self, key: str, value: dict[str, Any]) -> None:
        path = self.root / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, value)

    def delete(self, key: str) -> None:
        (self.root / f"{key}.json").unlink(missing_ok=True)

    def keys(self, folder: str) -> list[str]:
        return [f"{folder}/{p.stem}" for p in (self.root / folder).glob("*.json")]


class Registry:
    """Deployment records and the current pointer for one collection name.

    `store`: where the service and the retrain keep vectors; a store that offers a registry
    backend (a Qdrant server) holds the records, otherwise they are files under the data directory.
    """

    def __init__(self, settings: Settings, name: str | None = None, store: Any = None) -> None:
        self.name = name or settings.collection
        self.root = (Path(settings.data_dir) / "registry" / self.name).absolute()
        shared = getattr(store, "registry_backend", None)
        self.backend: RegistryBackend = shared(self.name) if shared else FileRegistryBackend(self.root)

    @property
    def exists(self) -> bool:
        return self.backend.read("current") is not None

    def lock(self) -> PidLock:
        """Held for a whole retrain or rollback: a second one is refused with the holder's pid."""
        self.root.mkdir(parents=True, exist_ok=True)
        return PidLock(
            self.root / "retrain.lock",
            f"a retrain or rollback of {self.name!r} is already running (pid {{pid}}); wait for it",
        )

    def models_dir(self, deployment: int) -> Path:
        return self.root / "models" / f"d{deployment}"

    def runs_dir(self) -> Path:
        return self.root / "runs"

    def records(self) -> list[DeploymentRecord]:
        """Every deployment, oldest first."""
        found = [self.backend.read(key) for key in self.backend.keys("deployments")]
        return sorted(
            (DeploymentRecord.model_validate(r) for r in found if r is not None), key=lambda r: r.id
        )

    def get(self, deployment: int) -> DeploymentRecord:
        found = self.backend.read(f"deployments/d{deployment}")
        if found is None:
            known = ", ".join(f"d{r.id}" for r in self.records()) or "none"
            raise StoreError(f"deployment d{deployment} of {self.name!r} does not exist (known: {known})")
        return DeploymentRecord.model_validate(found)

    def current(self) -> DeploymentRecord | None:
        pointer = self.backend.read("current")
        return None if pointer is None else self.get(int(pointer["deployment"]))

    def next_id(self) -> int:
        records = self.records()
        return records[-1].id + 1 if records else 1

    def add(self, record: DeploymentRecord) -> None:
        """Write a record (not yet current); ids are never reused (the retrain lock serialises writers)."""
        key = f"deployments/d{record.id}"
        if self.backend.read(key) is not None:
            raise StoreError(f"deployment d{record.id} of {self.name!r} already exists")
        self.backend.write(key, record.model_dump(mode="json"))

    def set_calibration(self, deployment: int, calibration: Calibration) -> DeploymentRecord:
        """Store a refitted calibration in a record (the one field a record's rewrite may change;
        the service picks it up within `api.alias_refresh_s`)."""
        record = self.get(deployment).model_copy(update={"calibration": calibration})
        self.backend.write(f"deployments/d{deployment}", record.model_dump(mode="json"))
        return record

    def point_to(self, record: DeploymentRecord) -> None:
        """Make `record` the deployment (one atomic write; the API follows it)."""
        self.backend.write(
            "current", {"deployment": record.id, "collection": record.collection, "at": now_iso()}
        )

    def canary(self) -> Canary | None:
        """The canary being served, if any (every replica follows it through the registry)."""
        found = self.backend.read("canary")
        return None if found is None else Canary.model_validate(found)

    def set_canary(self, canary: Canary | None) -> None:
        if canary is None:
            self.backend.delete("canary")
        else:
            self.backend.write("canary", canary.model_dump(mode="json"))

    def record_canary(self, canary: Canary, outcome: dict[str, Any]) -> None:
        """Keep a decided canary's tallies and test (`canaries/dN`), then stop serving it."""
        self.backend.write(f"canaries/d{canary.deployment}", {**canary.model_dump(mode="json"), **outcome})
        self.set_canary(None)

    def canary_outcomes(self) -> dict[int, dict[str, Any]]:
        """Decided canaries by candidate id."""
        found = [self.backend.read(key) for key in self.backend.keys("canaries")]
        return {int(o["deployment"]): o for o in found if o is not None}

    def pending(self) -> dict[str, Any] | None:
        """The collection version an unfinished retrain was building (left by a crash), if any."""
        return self.backend.read("pending")

    def set_pending(self, collection: str | None, run: str | None = None) -> None:
        if collection is None:
            self.backend.delete("pending")
        else:
            self.backend.write("pending", {"collection": collection, "run": run, "at": now_iso()})


def switch(registry: Registry, store: VectorStore, record: DeploymentRecord) -> None:
    """Serve `record`: the registry pointer first (collection and both models in one write, what
    the API follows), then the store's alias for clients that read Qdrant directly."""
    registry.point_to(record)
    store.set_alias(registry.name, record.collection)


def current_deployment(registry: Registry, store: VectorStore, settings: Settings) -> DeploymentRecord:
    """The deployed pair; before the first retrain, the alias plus the configured models
    (recorded then as deployment 1, so there is something to roll back to)."""
    record = registry.current()
    if record is not None:
        return record
    manifest = active_manifest(store, registry.name)
    record = DeploymentRecord(
        id=registry.next_id(),
        collection=manifest.collection,
        embedder=settings.embedder.model,
        embedder_id=manifest.embedder,
        reranker=settings.reranker.model,
    )
    registry.add(record)
    registry.point_to(record)
    return record


def clean_pending(registry: Registry, store: VectorStore, say: Say) -> None:
    """Remove the collection version a crashed run left half-built (never a deployed one)."""
    pending = registry.pending()
    if pending is None:
        return
    deployed = {r.collection for r in registry.records()}
    collection = pending["collection"]
    if collection not in deployed and collection in store.list_collections():
        say(f"removing {collection}, left unfinished by run {pending.get('run')}")
        store.delete_collection(collection)
    registry.set_pending(None)


def rollback(
    settings: Settings, store: VectorStore, to: int | None = None, say: Say = print
) -> DeploymentRecord:
    """Point the registry and the alias back at deployment `to` (default: the current one's parent)."""
    registry = Registry(settings, store=store)
    with registry.lock():
        current = registry.current()
        if current is None:
            raise InputError(f"{registry.name!r} has no registered deployments (nothing was retrained yet)")
        if to is None:
            if current.parent is None:
                raise InputError(f"deployment d{current.id} has no previous deployment to roll back to")
            to = current.parent
        target = registry.get(to)
        if target.collection not in store.list_collections():
            raise StoreError(f"deployment d{target.id}'s collection {target.collection} no longer exists")
        canary = registry.canary()
        if canary is not None:  # a rollback ends a canary too: serve one deployment, the one asked for
            registry.record_canary(canary, {"decision": "stopped", "why": f"rollback to d{target.id}"})
            say(f"stopped the canary of d{canary.deployment}")
        switch(registry, store, target)
        say(f"rolled back {registry.name}: d{current.id} -> d{target.id} ({target.collection}, "
            f"embedder {target.embedder}, reranker {target.reranker})")  # fmt: skip
        return target


def deployments_table(settings: Settings, store: VectorStore | None = None) -> list[dict[str, Any]]:
    """`twostage versions`: every deployment with its metrics, marked when current."""
    registry = Registry(settings, store=store)
    current, canary, outcomes = registry.current(), registry.canary(), registry.canary_outcomes()
    rows = []
    for record in registry.records():
        row = record.model_dump(mode="json")
        row["current"] = current is not None and record.id == current.id
        row["canary"] = canary.model_dump(mode="json") if canary and canary.deployment == record.id else None
        row["canary_outcome"] = outcomes.get(record.id)
        rows.append(row)
    return rows


# -- the pair a process serves --------------------------------------------------------------


def check_built_by(manifest: CollectionManifest, embedder: Embedder, settings: Settings, label: str) -> None:
    """Refuse (409) an index built by another embedder: its vectors and ours are not comparable."""
    mismatch = embedder_mismatch(manifest, embedder, settings.numerics.embedder_min_cosine)
    if mismatch is not None:
        raise StoreError(f"{label}{mismatch}")


def load_served(
    settings: Settings, store: VectorStore, collection: str, *, reranker: bool = True
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

    def __init__(self, settings: Settings, store: VectorStore, models: ModelCache) -> None:
        self.settings, self.store, self.models = settings, store, models
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
