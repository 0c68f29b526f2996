"""Two API replicas on one Qdrant follow a deployment switch and a rollback.

In server mode the registry (records, current pointer) lives in Qdrant, so replicas on other
machines see a switch. Here both replicas run in this test process on one qdrant-client
local-mode store object (local mode is a file lock that one process alone may hold, so two
processes cannot share it; a Qdrant server would be shared the same way by separate
processes): each replica is a full app on its own port with its own models and refresher.
"""

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from test_api import Served, serve

from twostage.api.runtime.service import Service
from twostage.api.settings import Settings
from twostage.retrieval.deployments.lifecycle import current_deployment, rollback
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
