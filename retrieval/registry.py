"""The model registry: which (collection version, embedder, reranker) is deployed, and history.

A directory per collection name, no server:

    DATA/registry/NAME/deployments/dN.json   one record per deployment (never rewritten)
    DATA/registry/NAME/models/dN/embedder    merged models of deployment N (when it trained them)
    DATA/registry/NAME/models/dN/reranker
    DATA/registry/NAME/current.json          {"deployment": N}: the one pointer the API follows
    DATA/registry/NAME/runs/RUN/             each retrain's manifest, report.json, report.png
    DATA/registry/NAME/retrain.lock          flock + pid: one retrain at a time

The pointer names the collection version and both models together, so switching it (one
atomic rename) moves all three at once; the store's alias is moved right after it for
clients that read Qdrant directly. Without a registry the deployment is the alias plus the
configured models, exactly as before the first retrain.
"""

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from twostage.retrieval.locks import PidLock, write_json_atomic
from twostage.retrieval.settings import Settings
from twostage.retrieval.store import StoreError, now_iso


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
    created_at: str = Field(default_factory=now_iso)


class Registry:
    """Deployment records and the current pointer for one collection name."""

    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.name = name or settings.collection
        self.root = Path(settings.data_dir) / "registry" / self.name

    @property
    def exists(self) -> bool:
        return (self.root / "current.json").exists()

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
        folder = self.root / "deployments"
        found = [DeploymentRecord.model_validate_json(p.read_text()) for p in folder.glob("d*.json")]
        return sorted(found, key=lambda r: r.id)

    def get(self, deployment: int) -> DeploymentRecord:
        path = self.root / "deployments" / f"d{deployment}.json"
        if not path.exists():
            known = ", ".join(f"d{r.id}" for r in self.records()) or "none"
            raise StoreError(f"deployment d{deployment} of {self.name!r} does not exist (known: {known})")
        return DeploymentRecord.model_validate_json(path.read_text())

    def current(self) -> DeploymentRecord | None:
        pointer = self.root / "current.json"
        if not pointer.exists():
            return None
        return self.get(int(json.loads(pointer.read_text())["deployment"]))

    def next_id(self) -> int:
        records = self.records()
        return records[-1].id + 1 if records else 1

    def add(self, record: DeploymentRecord) -> None:
        """Write a record (not yet current); ids are never reused."""
        folder = self.root / "deployments"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"d{record.id}.json"
        if path.exists():
            raise StoreError(f"deployment d{record.id} of {self.name!r} already exists")
        write_json_atomic(path, record.model_dump(mode="json"))

    def point_to(self, record: DeploymentRecord) -> None:
        """Make `record` the deployment (one atomic rename; the API follows it)."""
        pointer = {"deployment": record.id, "collection": record.collection, "at": now_iso()}
        write_json_atomic(self.root / "current.json", pointer)

    def pending(self) -> dict[str, Any] | None:
        """The collection version an unfinished retrain was building (left by a crash), if any."""
        path = self.root / "pending.json"
        return json.loads(path.read_text()) if path.exists() else None

    def set_pending(self, collection: str | None, run: str | None = None) -> None:
        path = self.root / "pending.json"
        if collection is None:
            path.unlink(missing_ok=True)
        else:
            write_json_atomic(path, {"collection": collection, "run": run, "at": now_iso()})
