"""What Qdrant Edge (qdrant-edge-py) lets a query do while another thread writes or optimises.

No lock of ours: one thread runs `update` (upserts of 1,000 points) or `optimize()` (the
HNSW build) on a shard while the main thread queries it back to back. Reported: query
latency idle and during each, and how many queries completed. Measured here: queries run
between and alongside upserts (so `EdgeStore` lets reads skip the writers' lock), but
next to none complete during `optimize()` (it holds the GIL), which is why the service
optimises only after bulk loads (`ingest.optimize_after`). Last line: one JSON object.

    python bench/edge_concurrency.py
"""

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_info


def upsert(shard: Any, vectors: np.ndarray, start: int, stop: int) -> Any:
    points = [qe.Point(j, vectors[j].tolist(), {"k": j}) for j in range(start, stop)]
    return shard.update(qe.UpdateOperation.upsert_points(points))


def queries_during(shard: Any, request: Any, work: Callable[[], None]) -> dict[str, Any]:
    """Query back to back while `work` runs in another thread."""
    done = threading.Event()
    began = time.perf_counter()

    def run() -> None:
        work()
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    latencies = []
    while not done.is_set():
        started = time.perf_counter()
        shard.query(request)
        latencies.append((time.perf_counter() - started) * 1000)
    thread.join()
    figures: dict[str, Any] = {"work_s": round(time.perf_counter() - began, 2), "queries": len(latencies)}
    if latencies:
        figures |= {
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "max_ms": round(max(latencies), 1),
        }
    return figures


def main() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 384))
    vectors = (centres[rng.integers(0, 50, 60000)] + 0.3 * rng.normal(size=(60000, 384))).astype(np.float32)
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=384, distance=qe.Distance.Cosine),
        hnsw_config=qe.HnswIndexConfig(m=16, ef_construct=100, full_scan_threshold=10000),
    )
    with tempfile.TemporaryDirectory() as tmp:
        shard = qe.EdgeShard.create(str(Path(tmp) / "shard"), config)
        for i in range(0, 20000, 1000):
            upsert(shard, vectors, i, i + 1000)
        shard.optimize()
        request = qe.QueryRequest(limit=10, query=qe.Query.Nearest(vectors[0].tolist()), with_payload=True)
        idle = []
        for _ in range(300):
            started = time.perf_counter()
            shard.query(request)
            idle.append((time.perf_counter() - started) * 1000)

        def upserts() -> None:
            for i in range(20000, 40000, 1000):
                upsert(shard, vectors, i, i + 1000)

        during_upserts = queries_during(shard, request, upserts)
        for i in range(40000, 60000, 1000):
            upsert(shard, vectors, i, i + 1000)
        during_optimize = queries_during(shard, request, shard.optimize)
        shard.close()
    print(json.dumps({
        "bench": "edge_concurrency", "qdrant_edge_points": 60000, "dim": 384,
        "idle": {"p50_ms": round(float(np.percentile(idle, 50)), 2),
                 "p99_ms": round(float(np.percentile(idle, 99)), 2)},
        "during_20_upserts_of_1000_points": during_upserts,
        "during_optimize_of_40000_new_points": during_optimize,
        **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
