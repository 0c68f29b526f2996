"""Embedded store latency and recall on real embeddings, against exact numpy search.

Vectors: all-MiniLM-L6-v2 embeddings of debian-ir's corpus (cached after the first run),
and a 100k set made of those plus noisy copies (each a real vector + N(0, sigma) per
dimension, renormalised), which adds many close neighbours. Queries: debian-ir dev queries.
For each set: Qdrant Edge (HNSW, after optimize) at the default and at tuned `hnsw_ef`, and
qdrant-client's local mode (brute force) for comparison; p50/p95 latency of one query
through our `VectorStore.search` and recall@10 against exact cosine search in numpy.
Last line: one JSON object.

    python bench/store.py
"""

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.api.settings import Settings
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.store.edge import EdgeStore
from twostage.retrieval.store.qdrant import QdrantStore
from twostage.retrieval.store.settings import StoreSettings
from twostage.retrieval.store.vector_store import CollectionManifest, Point, VectorStore


def real_vectors(model: str, cache_dir: Path, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and query embeddings, computed once and cached as .npy."""
    cache = cache_dir / "bench-store" / model.replace("/", "_").replace(":", "_")
    if not (cache / "corpus.npy").exists():
        cache.mkdir(parents=True, exist_ok=True)
        embedder = load_embedder(Settings(embedder={"model": model}, cache_dir=cache_dir))
        corpus = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl")]
        queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl")]
        np.save(cache / "corpus.npy", embedder.embed_documents(corpus))
        np.save(cache / "queries.npy", embedder.embed_queries(queries))
    return np.load(cache / "corpus.npy"), np.load(cache / "queries.npy")[:n_queries]


def noisy_copies(vectors: np.ndarray, total: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    extra = vectors[rng.integers(0, len(vectors), total - len(vectors))]
    extra = extra + rng.normal(0, sigma, extra.shape).astype(np.float32)
    out = np.concatenate([vectors, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    return out.astype(np.float32)


def load(store: VectorStore, vectors: np.ndarray, collection: str) -> float:
    name, dim = collection.split("__")[0], vectors.shape[1]
    manifest = CollectionManifest(
        name=name, version=1, embedder="bench", embedder_model="bench", dim=dim, chunker={}
    )
    store.create_collection(manifest)
    started = time.perf_counter()
    for i in range(0, len(vectors), 2000):
        store.upsert(
            collection,
            [
                Point(str(uuid.UUID(int=j)), vectors[j], {"n": j})
                for j in range(i, min(i + 2000, len(vectors)))
            ],
        )
    store.optimize(collection)
    return time.perf_counter() - started


def measure(
    store: VectorStore, collection: str, queries: np.ndarray, truth: np.ndarray, hnsw_ef: int | None
) -> dict[str, Any]:
    for q in queries[:10]:  # warm-up
        store.search(collection, q, 10, hnsw_ef=hnsw_ef)
    latencies, recalls = [], []
    for q, expected in zip(queries, truth, strict=True):
        started = time.perf_counter()
        hits = store.search(collection, q, 10, hnsw_ef=hnsw_ef)
        latencies.append((time.perf_counter() - started) * 1000)
        recalls.append(len({int(h.payload["n"]) for h in hits} & set(expected.tolist())) / 10)
    return {
        "hnsw_ef": hnsw_ef if hnsw_ef is not None else "default",
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p95_ms": round(float(np.percentile(latencies, 95)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--large", type=int, default=100_000, help="size of the noisy-copies set")
    parser.add_argument("--sigma", type=float, default=0.01, help="noise per dimension of the copies")
    parser.add_argument("--ef", type=int, nargs="*", default=[64, 128, 256, 512], help="tuned hnsw_ef values")
    parser.add_argument("--local-max", type=int, default=100_000, help="skip local mode above this size")
    args = parser.parse_args()

    corpus, queries = real_vectors(args.model, Path(args.cache_dir), args.queries)
    sets = {
        "debian": corpus,
        f"debian+noise-{args.large // 1000}k": noisy_copies(corpus, args.large, args.sigma, 0),
    }
    configurations = []
    for name, vectors in sets.items():
        truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        with tempfile.TemporaryDirectory() as tmp:
            edge = EdgeStore(Path(tmp), StoreSettings())
            build_s = load(edge, vectors, "bench__v1")
            for ef in [None, *args.ef]:
                row = measure(edge, "bench__v1", queries, truth, ef)
                configurations.append({"set": name, "engine": "qdrant-edge", "n_points": len(vectors),
                                       "build_s": round(build_s, 1), **row})  # fmt: skip
                print(json.dumps(configurations[-1]), file=sys.stderr)
            edge.close()
            if len(vectors) <= args.local_max:
                local = QdrantStore(StoreSettings(kind="qdrant", location=":memory:"))
                build_s = load(local, vectors, "bench__v1")
                row = measure(local, "bench__v1", queries, truth, None)
                configurations.append({"set": name, "engine": "qdrant-client-local", "n_points": len(vectors),
                                       "build_s": round(build_s, 1), **row})  # fmt: skip
                print(json.dumps(configurations[-1]), file=sys.stderr)
                local.close()
    exact_ms = []
    for q in queries[:100]:
        started = time.perf_counter()
        np.argsort(-(sets[list(sets)[1]] @ q))[:10]
        exact_ms.append((time.perf_counter() - started) * 1000)
    result = {
        "bench": "store",
        "model": args.model,
        "queries": len(queries),
        "sigma": args.sigma,
        "numpy_exact_p50_ms_large": round(float(np.percentile(exact_ms, 50)), 3),
        "configurations": configurations,
        **run_info("cpu"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
