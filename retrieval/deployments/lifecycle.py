"""Changing what is served: switch, rollback, and a canary's start and settlement.

Each change is one write of the registry pointer (collection and both models together), taken
under the registry's lock, so replicas that follow the pointer (`follower.py`) see one
consistent pair; the store's alias follows for clients that read Qdrant directly. A canary is
started here (`start_canary`) and settled here (`settle`): whichever replica takes the lock decides,
by the tests in `canary.py` (an interleaved canary's sequential test at every check, a split
canary's once its budget is spent), and records the outcome.
"""

import time

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.deployments.canary import Decision, Tallies, decide, tallies
from twostage.retrieval.deployments.registry import Canary, DeploymentRecord, Registry, Say
from twostage.retrieval.search.settings import QuerySettings
from twostage.retrieval.store.collections import active_manifest
from twostage.retrieval.store.locks import Locks
from twostage.retrieval.store.vector_store import (
    StoreError,
    StoreLockedError,
    VectorStore,
    now_iso,
)
from twostage.retrieval.traffic.coordination import holder
from twostage.retrieval.traffic.log import CanaryOutcome, TrafficLog


def switch(registry: Registry, store: VectorStore, record: DeploymentRecord) -> None:
    """Serve `record`: the registry pointer first (collection and both models in one write, what
    the API follows), then the store's alias for clients that read Qdrant directly."""
    registry.point_to(record)
    store.set_alias(registry.name, record.collection)


def current_deployment(registry: Registry, store: VectorStore, settings: QuerySettings) -> DeploymentRecord:
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
    settings: QuerySettings,
    store: VectorStore,
    to: int | None = None,
    say: Say = print,
    locks: Locks | None = None,
) -> DeploymentRecord:
    """Point the registry and the alias back at deployment `to` (default: the current one's parent);
    under the registry's lock (`locks`: where it lives, `coordination_locks`)."""
    registry = Registry(settings, store=store, locks=locks)
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


def start_canary(
    registry: Registry,
    record: DeploymentRecord,
    control: DeploymentRecord,
    *,
    share: float,
    interleave: bool,
    max_events: int,
    max_seconds: float,
    alpha: float,
) -> Canary:
    """Record `record` and let it serve `share` of sessions beside `control` (the caller holds the
    registry's lock); every service follows it as it follows a switch, and `settle` decides."""
    registry.add(record)
    canary = Canary(
        deployment=record.id, control=control.id, share=share, interleave=interleave,
        max_events=max_events, max_seconds=max_seconds, alpha=alpha,
    )  # fmt: skip
    registry.set_canary(canary)
    registry.set_pending(None)
    return canary


def settle(settings: QuerySettings, store: VectorStore, log: TrafficLog, collection: str) -> str | None:
    """Decide `collection`'s canary once its test says so: switch to the candidate or stop serving
    it, and keep the tallies (`Registry.record_canary`, and the log's `canary_outcomes` where every
    replica reads them). The look itself takes no lock (an interleaved canary is looked at every
    check); a decision is taken under the registry's lock, in the log's database where it is shared
    (`TrafficLog.locks`), on tallies read again there, so one replica decides, from every replica's
    events. None when there is nothing to decide (no canary, no decision yet, a retrain running)."""
    registry = Registry(settings, collection, store, locks=log.locks)
    canary = registry.canary()
    if canary is None or _look(log, canary) is None:
        return None
    lock = registry.lock()
    try:
        lock.acquire()
    except StoreLockedError:
        return None  # a retrain or rollback holds the registry: next time
    try:
        canary = registry.canary()  # another replica may have decided meanwhile
        looked = None if canary is None else _look(log, canary)
        if canary is None or looked is None:
            return None
        counted, decision, why = looked
        outcome = {"decision": decision, "why": why, "tallies": counted.as_dict(), "decided_at": now_iso()}
        if decision == "promote":
            switch(registry, store, registry.get(canary.deployment))
        registry.record_canary(canary, outcome)
        log.record_canary_outcome(CanaryOutcome(
            collection, canary.deployment, canary.started_ts, decision, why, counted.as_dict(), time.time(),
            holder(),
        ))  # fmt: skip
        return f"canary d{canary.deployment} of {collection}: {decision} ({why})"
    finally:
        lock.release()


def _look(log: TrafficLog, canary: Canary) -> tuple[Tallies, Decision, str] | None:
    """The canary's tallies and decision, None while it waits. A split canary's test is
    fixed-horizon: its tallies are read once, when the budget is spent (one count in SQL before)."""
    elapsed = time.time() - canary.started_ts
    spent = elapsed >= canary.max_seconds or log.canary_events(canary.started_ts) >= canary.max_events
    if not spent and not canary.interleave:
        return None
    counted = tallies(log, canary)
    decision, why = decide(canary, counted)
    return None if decision == "wait" else (counted, decision, why)
