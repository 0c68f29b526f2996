"""One contract, two engines: Qdrant Edge (embedded) and qdrant-client (local mode here).

Vectors are real all-MiniLM-L6-v2 embeddings of debian-ir documents, so top-k order and
scores are checked against exact numpy cosine search on realistic data.
"""

import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import DEBIAN_IR

from twostage.retrieval.ingest.documents import chunk_point_id
from twostage.retrieval.store.edge import EdgeStore
from twostage.retrieval.store.qdrant import QdrantStore
from twostage.retrieval.store.settings import StoreSettings
from twostage.retrieval.store.sparse import Bm25Encoder, Rrf, SparseManifest, SparseVec
from twostage.retrieval.store.vector_store import (
    AnyOf,
    CollectionManifest,
    Equals,
    Filter,
    Point,
    Range,
    StoreError,
    StoreLockedError,
    VectorStore,
    check_collection_name,
    parse_versioned_name,
)

DATA = DEBIAN_IR / "corpus.jsonl"
StoreFactory = Callable[[], VectorStore]


@pytest.fixture(scope="module")
def corpus_vectors(minilm_embedder) -> tuple[list[dict], np.ndarray]:
    with DATA.open() as handle:
        rows = [json.loads(next(handle)) for _ in range(120)]
    return rows, minilm_embedder.embed_documents([r["text"] for r in rows])


@pytest.fixture(params=["edge", "qdrant-local"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[VectorStore] = []

    def factory() -> VectorStore:
        if request.param == "edge":
            store: VectorStore = EdgeStore(tmp_path / "data")
        else:
            store = QdrantStore(StoreSettings(kind="qdrant", location=str(tmp_path / "qdrant")))
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def manifest(version: int = 1, dim: int = 384) -> CollectionManifest:
    return CollectionManifest(
        name="docs", version=version, embedder="minilm@test", embedder_model="x", dim=dim, chunker={}
    )


def points(rows: list[dict], vectors: np.ndarray, tag: str = "a") -> list[Point]:
    return [
        Point(
            chunk_point_id(r["_id"], 0),
            v,
            {"doc_id": r["_id"], "chunk_index": 0, "section": r["section"], "n": i, "tag": tag},
        )
        for i, (r, v) in enumerate(zip(rows, vectors, strict=True))
    ]


def test_upsert_is_idempotent_and_replaces_payloads(open_store: StoreFactory, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest())
    store.upsert("docs__v1", points(rows, vectors))
    store.upsert("docs__v1", points(rows, vectors, tag="b"))
    assert store.count("docs__v1") == len(rows)
    assert store.count("docs__v1", Filter(must=(Equals("tag", "b"),))) == len(rows)


def test_top_k_order_and_scores_match_exact_search(open_store: StoreFactory, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest())
    store.upsert("docs__v1", points(rows, vectors))
    store.optimize("docs__v1")
    for q in (0, 7, 42):
        query = vectors[q] + 0.05 * vectors[q + 1]
        exact = vectors @ (query / np.linalg.norm(query))
        expected = np.argsort(-exact)[:10]
        hits = store.search("docs__v1", query, 10)
        assert [h.payload["n"] for h in hits] == expected.tolist()
        np.testing.assert_allclose([h.score for h in hits], exact[expected], atol=1e-5)
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_payload_filters(open_store: StoreFactory, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest())
    store.upsert("docs__v1", points(rows, vectors))
    sections = [r["section"] for r in rows]
    some = sorted(set(sections))[:2]
    flt = Filter(must=(AnyOf("section", tuple(some)), Range("n", gte=10, lt=90)))
    expected = {i for i, s in enumerate(sections) if s in some and 10 <= i < 90}
    assert store.count("docs__v1", flt) == len(expected)
    hits = store.search("docs__v1", vectors[0], 1000, flt)
    assert {h.payload["n"] for h in hits} == expected
    assert {r.payload["n"] for r in store.scroll("docs__v1", flt, ["n"])} == expected
    not_first = Filter(must_not=(Equals("section", some[0]),))
    assert store.count("docs__v1", not_first) == sum(s != some[0] for s in sections)


def test_delete_by_document(open_store: StoreFactory, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest())
    store.upsert("docs__v1", points(rows, vectors))
    gone = (rows[3]["_id"], rows[5]["_id"])
    store.delete("docs__v1", Filter(must=(AnyOf("doc_id", gone),)))
    assert store.count("docs__v1") == len(rows) - 2
    assert not [r for r in store.scroll("docs__v1", None, ["doc_id"]) if r.payload["doc_id"] in gone]


def test_versions_and_alias_switch_keep_the_previous_version(
    open_store: StoreFactory, corpus_vectors
) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest(1))
    store.create_collection(manifest(2))
    store.upsert("docs__v1", points(rows[:10], vectors[:10]))
    store.upsert("docs__v2", points(rows, vectors))
    assert store.resolve_alias("docs") is None
    store.set_alias("docs", "docs__v1")
    assert store.resolve_alias("docs") == "docs__v1"
    store.set_alias("docs", "docs__v2")
    assert store.resolve_alias("docs") == "docs__v2"
    assert store.list_collections() == ["docs__v1", "docs__v2"]
    assert store.count("docs__v1") == 10
    assert store.read_manifest("docs__v2").version == 2
    with pytest.raises(StoreError, match="missing collection"):
        store.set_alias("docs", "docs__v9")
    with pytest.raises(StoreError, match="already exists"):
        store.create_collection(manifest(2))


def test_manifest_round_trip_and_reopen_after_close(open_store: StoreFactory, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    m = manifest()
    store.create_collection(m)
    store.upsert("docs__v1", points(rows, vectors))
    m.documents, m.chunks, m.status = len(rows), len(rows), "ready"
    store.write_manifest(m)
    store.set_alias("docs", "docs__v1")
    store.close()
    again = open_store()
    assert again.resolve_alias("docs") == "docs__v1"
    assert again.count("docs__v1") == len(rows)
    reread = again.read_manifest("docs__v1")
    assert (reread.documents, reread.status, reread.embedder, reread.dim) == (
        len(rows),
        "ready",
        "minilm@test",
        384,
    )
    assert again.search("docs__v1", vectors[4], 1)[0].payload["n"] == 4


def test_collection_names_are_checked() -> None:
    for bad in ["a b", "a/b", "", "docs__v1", "../x", "-x", "x" * 64, "docs\n"]:
        with pytest.raises(StoreError, match="invalid collection name"):
            check_collection_name(bad)
    assert check_collection_name("my-docs_2") == "my-docs_2"
    assert parse_versioned_name("my-docs__v12") == ("my-docs", 12)


def test_edge_shard_is_owned_by_one_process(tmp_path: Path, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = EdgeStore(tmp_path)
    store.create_collection(manifest())
    store.upsert("docs__v1", points(rows, vectors))
    other = textwrap.dedent(
        f"""
        from twostage.retrieval.store.edge import EdgeStore
        from twostage.retrieval.store.vector_store import StoreLockedError
        try:
            EdgeStore({str(tmp_path)!r}).count("docs__v1")
        except StoreLockedError as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, check=True)
    import os

    assert f"is in use by pid {os.getpid()}; stop the server or work through it" in result.stdout
    with pytest.raises(StoreLockedError):  # a second store in the same process is refused too
        EdgeStore(tmp_path).count("docs__v1")
    store.upsert("docs__v1", points(rows[:1], vectors[:1], tag="still-writable"))
    store.close()
    reopened = EdgeStore(tmp_path)
    assert reopened.count("docs__v1", Filter(must=(Equals("tag", "still-writable"),))) == 1
    reopened.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("prefer_grpc", [True, False])
def test_an_unreachable_server_is_one_clear_error(prefer_grpc: bool) -> None:
    """A Qdrant server that is down: StoreUnavailable naming the server, not a gRPC/httpx trace."""
    from twostage.retrieval.store.vector_store import StoreUnavailable

    port = _closed_port()
    store = QdrantStore(StoreSettings(
        kind="qdrant", url=f"http://127.0.0.1:{port}", grpc_port=port, prefer_grpc=prefer_grpc, timeout_s=2,
    ))  # fmt: skip
    try:
        for call in (
            lambda: store.resolve_alias("docs"),
            store.list_collections,
            lambda: store.count("docs"),
        ):
            with pytest.raises(
                StoreUnavailable, match=rf"Qdrant at http://127\.0\.0\.1:{port} (failed|is unreachable)"
            ):
                call()
    finally:
        store.close()


def _sparse_rows(rows: list[dict], vectors: np.ndarray) -> tuple[Bm25Encoder, list[Point]]:
    encoder = Bm25Encoder(SparseManifest())
    sparse = encoder.embed_documents([r["text"] for r in rows])
    return encoder, [replace(p, sparse=s) for p, s in zip(points(rows, vectors), sparse, strict=True)]


def _exact_bm25(docs: list[Point], query: SparseVec) -> np.ndarray:
    """Qdrant's IDF modifier by hand: sum over query tokens of q * ln(1 + (N - n + 0.5) / (n + 0.5)) * d."""
    df: dict[int, int] = {}
    for p in docs:
        assert p.sparse is not None
        for i in p.sparse.indices:
            df[i] = df.get(i, 0) + 1
    n_docs = len(docs)
    scores = np.zeros(n_docs)
    for j, p in enumerate(docs):
        assert p.sparse is not None
        weights = dict(zip(p.sparse.indices, p.sparse.values, strict=True))
        for i, q in zip(query.indices, query.values, strict=True):
            if i in weights:
                scores[j] += q * np.log(1 + (n_docs - df[i] + 0.5) / (df[i] + 0.5)) * weights[i]
    return scores


def _ranked(scores: np.ndarray, allowed: set[int], limit: int) -> list[int]:
    """Indices by score, best first (ties by index), scores > 0 only for BM25 callers to decide."""
    order = sorted(allowed, key=lambda i: (-scores[i], i))
    return order[:limit]


def test_sparse_and_hybrid_recall_match_an_exact_computation(
    open_store: StoreFactory, corpus_vectors
) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest().model_copy(update={"sparse": SparseManifest()}))
    encoder, docs = _sparse_rows(rows, vectors)
    store.upsert("docs__v1", docs)
    store.optimize("docs__v1")
    sections = [r["section"] for r in rows]
    keep = sorted(set(sections))[:3]
    for q, flt in ((3, None), (11, Filter(must=(AnyOf("section", tuple(keep)),)))):
        allowed = {i for i, s in enumerate(sections) if flt is None or s in keep}
        text = " ".join(rows[q]["text"].split()[:6]) + " package"
        sparse = encoder.embed_query(text)
        bm25 = _exact_bm25(docs, sparse)
        matching = {i for i in allowed if bm25[i] > 0}
        hits = store.search("docs__v1", None, 10, flt, sparse=sparse)
        assert [h.score for h in hits] == pytest.approx(
            sorted(bm25[list(matching)], reverse=True)[:10], rel=1e-4
        )
        assert all(bm25[h.payload["n"]] == pytest.approx(h.score, rel=1e-4) for h in hits)
        # hybrid: RRF of the two filtered branches (each its top `limit`), weights (2, 1), k 10;
        # Qdrant's weighted RRF divides the 1-based rank by the weight: w=1 is 1 / (k + rank0)
        dense = vectors @ (vectors[q] / np.linalg.norm(vectors[q]))
        branches = [_ranked(dense, allowed, 20), _ranked(bm25, matching, 20)]
        fused: dict[int, float] = {}
        for weight, branch in zip((2.0, 1.0), branches, strict=True):
            for rank, i in enumerate(branch):
                fused[i] = fused.get(i, 0.0) + 1 / (10 - 1 + (rank + 1) / weight)
        hits = store.search(
            "docs__v1", vectors[q], 20, flt, exact=True, sparse=sparse, fusion=Rrf(10, (2.0, 1.0))
        )
        assert {h.payload["n"] for h in hits} <= allowed
        assert [h.score for h in hits] == pytest.approx(sorted(fused.values(), reverse=True)[:20], rel=1e-5)
        assert all(fused[h.payload["n"]] == pytest.approx(h.score, rel=1e-5) for h in hits)


def test_a_dense_only_collection_refuses_sparse_queries(open_store: StoreFactory, corpus_vectors) -> None:
    rows, vectors = corpus_vectors
    store = open_store()
    store.create_collection(manifest())
    store.upsert("docs__v1", points(rows, vectors))
    encoder = Bm25Encoder(SparseManifest())
    with pytest.raises(Exception):  # noqa: B017 - each engine words it its own way; the service checks first
        store.search("docs__v1", None, 5, sparse=encoder.embed_query("chess"))
    with pytest.raises(StoreError, match="need a fusion"):
        store.search("docs__v1", vectors[0], 5, sparse=encoder.embed_query("chess"))
