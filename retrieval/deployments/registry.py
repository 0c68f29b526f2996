"""The model registry: which (collection version, embedder, reranker) is deployed, and history.

A directory per collection name, no server:

    DATA/registry/NAME/deployments/dN.json   one record per deployment (rewritten only to refit
                                             its calibration: `twostage calibrate`)
    DATA/registry/NAME/models/dN/embedder    merged models of deployment N (when it trained them)
    DATA/registry/NAME/models/dN/reranker
    DATA/registry/NAME/current.json          {"deployment": N}: the one pointer the API follows
    DATA/registry/NAME/runs/RUN/             each retrain's manifest, report.json, report.png
    DATA/registry/NAME/retrain.lock          flock + pid: one retrain at a time (with a shared
                                             PostgreSQL log: an advisory lock there instead)

The pointer names the collection version and both models together, so switching it (one
atomic rename) moves all three at once; the store's alias is moved right after it for
clients that read Qdrant directly. Without a registry the deployment is the alias plus the
configured models, exactly as before the first retrain.

In server mode (`store.kind = qdrant`) the records, the current pointer and the pending
marker live in Qdrant itself (`QdrantRegistryBackend`: a small `twostage_registry`
collection, one point per key), so every API replica on that cluster follows a switch
within `api.alias_refresh_s`; with `feedback.database_url` on PostgreSQL the lock is an advisory
lock in that database (`retrieval.traffic.coordination`), so replicas need no shared directory to
exclude each other; models and runs stay under the data directory, whose
promoted model directories are recorded by absolute path: on shared storage mounted at the
same path, every replica loads them.
"""

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.settings import QuerySettings
from twostage.retrieval.store.locks import FileLocks, Lock, Locks, write_json_atomic
from twostage.retrieval.store.vector_store import (
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
    service's canary watcher decides from the feedback: interleaved, as soon as the sequential
    test does; split, once a budget is spent (`retrieval.deployments.lifecycle.settle`)."""

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

    def __init__(
        self, settings: QuerySettings, name: str | None = None, store: Any = None, locks: Locks | None = None
    ) -> None:
        self.name = name or settings.collection
        self.root = (Path(settings.data_dir) / "registry" / self.name).absolute()
        self.locks = locks or FileLocks(self.root.parent)
        shared = getattr(store, "registry_backend", None)
        self.backend: RegistryBackend = shared(self.name) if shared else FileRegistryBackend(self.root)

    @property
    def exists(self) -> bool:
        return self.backend.read("current") is not None

    def lock(self) -> Lock:
        """Held for a whole retrain, rollback, calibration or canary decision: a second one is refused
        with the holder's pid. `locks`: where (`coordination_locks`: the shared database, or files)."""
        return self.locks.lock(
            f"{self.name}/retrain",
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


def deployments_table(settings: QuerySettings, store: VectorStore | None = None) -> list[dict[str, Any]]:
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
