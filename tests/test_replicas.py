"""Two API replicas on one Qdrant follow a deployment switch and a rollback; with one PostgreSQL
they share the search log, feedback and the canary's decision.

In server mode the registry (records, current pointer) lives in Qdrant, so replicas on other
machines see a switch. Here both replicas run in this test process on one qdrant-client
local-mode store object (local mode is a file lock that one process alone may hold, so two
processes cannot share it; a Qdrant server would be shared the same way by separate
processes): each replica is a full app on its own port with its own models and refresher.
"""

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import run_cli
from postgres import remove, start_postgres
from test_api import Served, serve

from twostage.api.runtime.service import Service
from twostage.api.settings import Settings
from twostage.retrieval.deployments.lifecycle import current_deployment, rollback, settle, start_canary
from twostage.retrieval.deployments.registry import FileRegistryBackend, Registry, deployments_table
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import Document
from twostage.retrieval.ingest.pipeline import ingest_corpus
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.qdrant import REGISTRY_COLLECTION, QdrantStore
from twostage.retrieval.store.vector_store import VectorStore
from twostage.retrieval.traffic.coordination import coordination_locks
from twostage.retrieval.traffic.log import TrafficLog

DOCS = ["chess engine for the terminal", "image viewer", "strategy game", "JSON parser", "text editor"]


@pytest.fixture()
def shared(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> Iterator[tuple[Settings, VectorStore]]:
    settings = Settings(
        data_dir=tmp_path / "data", cache_dir=model_cache, device="cpu",
        embedder={"model": str(tiny_models.embedder)}, reranker={"model": str(tiny_models.reranker)},
        store={"kind": "qdrant", "location": str(tmp_path / "qdrant")},
        api={"alias_refresh_s": 0.2, "batch_wait_ms": 1},
    )  # fmt: skip
    store = open_store(settings)
    yield settings, store
    store.close()


def ingest(settings: Settings, store: VectorStore, texts: list[str], new_version: bool) -> None:
    embedder = load_embedder(settings)
    documents = [Document(f"d{i}", text, "", "t", {}) for i, text in enumerate(texts)]
    chunker = Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder)
    ingest_corpus(documents, store=store, embedder=embedder, chunker=chunker, settings=settings,
                  collection="docs", new_version=new_version)  # fmt: skip


def served_collection(replica: Served) -> str:
    answer = httpx.post(replica.url + "/v1/search", json={"query": "chess", "rerank": False}, timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["collection"])


def wait_for(replicas: list[Served], collection: str) -> float:
    """Seconds until every replica serves `collection`."""
    started = time.monotonic()
    while any(served_collection(r) != collection for r in replicas):
        assert time.monotonic() - started < 20, [served_collection(r) for r in replicas]
        time.sleep(0.05)
    return time.monotonic() - started


def test_replicas_follow_a_switch_and_a_rollback_through_the_registry_in_qdrant(
    shared: tuple[Settings, VectorStore],
) -> None:
    settings, store = shared
    ingest(settings, store, DOCS, new_version=False)
    registry = Registry(settings, store=store)
    first = current_deployment(registry, store, settings)  # d1, as a first retrain records it
    assert isinstance(store, QdrantStore) and store.client.collection_exists(REGISTRY_COLLECTION)
    assert first.collection == "docs__v1"
    assert not (registry.root / "current.json").exists()  # in Qdrant, not in the data directory
    assert FileRegistryBackend(registry.root).read("current") is None

    with ExitStack() as stack:
        replicas = [
            stack.enter_context(contextmanager(serve)(settings, Service(settings, store=store)))
            for _ in range(2)
        ]
        assert [served_collection(r) for r in replicas] == ["docs__v1", "docs__v1"]

        # a retrain's promotion: a new version, its record, then the pointer (the alias follows it,
        # but is held at v1 here, so only the registry in Qdrant can tell the replicas)
        ingest(settings, store, [*DOCS, "network scanner"], new_version=True)
        store.set_alias("docs", "docs__v1")
        second = first.model_copy(update={"id": 2, "collection": "docs__v2", "parent": 1})
        registry.add(second)
        registry.point_to(second)
        assert wait_for(replicas, "docs__v2") < 5 * settings.api.alias_refresh_s + 2
        assert store.resolve_alias("docs") == "docs__v1"

        rollback(settings, store, say=lambda _: None)
        assert wait_for(replicas, "docs__v1") < 5 * settings.api.alias_refresh_s + 2
        table = deployments_table(settings, store)
        assert [(row["id"], row["current"]) for row in table] == [(1, True), (2, False)]


def test_replicas_share_one_log_and_one_canary_decision_in_postgres(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    """Two replicas with their own data directories, one store and one PostgreSQL: feedback goes
    to either, an event is stored once, the canary is decided once from both replicas' events, the
    CLI counts both, and a database outage costs feedback (503) but not searches."""
    server = start_postgres()  # this test's own: it is stopped and started again below
    try:
        url = server.new_database()

        def replica_settings(name: str) -> Settings:
            return Settings(
                data_dir=tmp_path / name, cache_dir=model_cache, device="cpu",
                embedder={"model": str(tiny_models.embedder)}, reranker={"model": str(tiny_models.reranker)},
                store={"kind": "qdrant", "location": str(tmp_path / "qdrant")}, feedback={"database_url": url},
                retrain={"canary_check_s": 3600}, api={"alias_refresh_s": 0.2, "batch_wait_ms": 1},
            )  # fmt: skip

        settings = replica_settings("a")
        store = open_store(settings)
        ingest(settings, store, DOCS, new_version=False)
        ingest(settings, store, [*DOCS, "network scanner"], new_version=True)
        store.set_alias("docs", "docs__v1")
        registry = Registry(
            settings, store=store, locks=coordination_locks(settings.feedback, settings.data_dir)
        )
        with registry.lock():
            first = current_deployment(registry, store, settings)
            second = first.model_copy(update={"id": 2, "collection": "docs__v2", "parent": 1})
            start_canary(registry, second, first, share=1.0, interleave=True, max_events=100, max_seconds=3600,
                         alpha=0.05)  # fmt: skip
        log = TrafficLog(tmp_path / "reader", settings.feedback)
        with ExitStack() as stack:
            a, b = (stack.enter_context(contextmanager(serve)(replica_settings(n), Service(replica_settings(n),
                    store=store))) for n in ("a", "b"))  # fmt: skip

            def search(replica: Served, session: str) -> dict[str, Any]:
                body = {"query": "chess", "session": session, "rerank": False}
                answer = httpx.post(replica.url + "/v1/search", json=body, timeout=60)
                assert answer.status_code == 200, answer.text
                return dict(answer.json())

            def feedback(replica: Served, events: list[dict[str, Any]]) -> httpx.Response:
                return httpx.post(replica.url + "/v1/feedback", json={"events": events}, timeout=60)

            clicks = []
            for i in range(12):  # searches on A and B in turn; each click on the candidate's pick
                answered_by, told = (a, b) if i % 2 == 0 else (b, a)
                answer = search(answered_by, f"s{i}")
                assert "interleave" in answer["stages"], answer
                logged = log.search(answer["search_id"])
                assert logged is not None and logged.arm == "interleaved"
                pick = next(h for h in logged.hits if h.team == "candidate")
                clicks.append((told, {"search_id": answer["search_id"], "id": pick.id, "event": "click",
                                      "event_id": f"click-{i}"}))  # fmt: skip
            for told, event in clicks:  # to the replica that did not answer
                assert feedback(told, [event]).json() == {"accepted": 1, "duplicates": 0}
            assert feedback(a, [clicks[0][1]]).json() == {"accepted": 0, "duplicates": 1}  # sent to both
            assert feedback(b, [clicks[0][1]]).json() == {"accepted": 0, "duplicates": 1}
            assert log.canary_events(0.0) == 12 and Registry(settings, store=store).canary() is not None
            # both replicas' watchers look at once (called here, so that they race): one decides
            said: list[str | None] = []

            def look(replica: Served) -> None:
                assert replica.service.traffic is not None
                said.append(settle(replica.settings, store, replica.service.traffic, "docs"))

            looks = [threading.Thread(target=look, args=(r,)) for r in (a, b)]
            for thread in looks:
                thread.start()
            for thread in looks:
                thread.join()
            decided = [s for s in said if s is not None]
            assert len(said) == 2 and len(decided) == 1 and "promote" in decided[0], said
            assert settle(settings, store, log, "docs") is None  # decided: nothing left to decide
            (outcome,) = log.canary_outcomes("docs")
            assert outcome.decision == "promote" and outcome.deployment == 2
            assert (outcome.tallies["wins"], outcome.tallies["losses"], outcome.tallies["events"]) == (
                12,
                0,
                12,
            )
            assert Registry(settings, store=store).current().id == 2  # type: ignore[union-attr]
            assert wait_for([a, b], "docs__v2") < 10

            env = {
                **os.environ,
                "TWOSTAGE_DATA_DIR": str(tmp_path / "cli"),
                "TWOSTAGE_FEEDBACK__DATABASE_URL": url,
            }
            stats = run_cli(["feedback", "stats", "--json"], env)
            assert stats.returncode == 0, stats.stderr
            counted = json.loads(stats.stdout)
            assert counted["searches"] == len(log.searches()) >= 12 and counted["events"]["click"] == 12

            server.stop()  # the database goes away: searches go on without a search id, feedback waits
            answer = search(a, "outage")
            assert answer["search_id"] is None and answer["hits"]
            assert any("not logged" in note and "unavailable" in note for note in answer["notes"])
            refused = feedback(b, [clicks[0][1]])
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
            assert "unavailable" in refused.json()["detail"]
            server.start()
            answer = search(a, "after")
            assert answer["search_id"] is not None  # the pool reconnects on its own
            event = {"search_id": answer["search_id"], "id": answer["hits"][0]["id"], "event": "click"}
            assert feedback(b, [event]).json() == {"accepted": 1, "duplicates": 0}
        log.close()
        store.close()
    finally:
        remove(server)
