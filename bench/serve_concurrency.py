"""Service throughput vs concurrency: does micro-batching turn concurrent requests into batches?

Starts the app in-process on a free port (uvicorn), then sends the same number of requests
at several concurrency levels to `/v2/rerank` (each call: one query, 10 debian-ir
documents) and `/v1/embeddings` (one query). Reports requests/s, p50/p95 latency and the
mean items per model batch. Last line: one JSON object.

    python bench/serve_concurrency.py                      # tiny Qwen3 reranker + MiniLM
    python bench/serve_concurrency.py --reranker pypi:SmolLM2-135M-Instruct
"""

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.api.http.app import create_app
from twostage.api.settings import Settings
from twostage.retrieval.models.tiny import write_tiny_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--reranker", default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--cache-dir", default=".twostage/cache")
    args = parser.parse_args()

    reranker = args.reranker
    if reranker == "tiny":
        tiny = Path(args.cache_dir) / "bench-tiny"
        if not (tiny / "qwen3-reranker-tiny" / "model.safetensors").exists():
            write_tiny_models(tiny)
        reranker = str(tiny / "qwen3-reranker-tiny")
    corpus = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", 2000)]
    queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl", args.requests)]

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp), cache_dir=Path(args.cache_dir), embedder={"model": args.embedder},
            reranker={"model": reranker},
        )  # fmt: skip
        app = create_app(settings)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        service = app.state.service
        rows: list[dict[str, Any]] = []
        with httpx.Client(timeout=300) as client:
            for route in ("/v2/rerank", "/v1/embeddings"):
                for concurrency in args.concurrency:
                    rows.append(run(client, url, route, queries, corpus, concurrency, service))
                    print(json.dumps(rows[-1]), file=sys.stderr)
        server.should_exit = True

    info = run_info(str(settings.device))
    result = {"bench": "serve_concurrency", "embedder": args.embedder, "reranker": reranker, "results": rows}
    print(json.dumps({**result, "requests": len(queries), **info}))


def run(
    client: httpx.Client,
    url: str,
    route: str,
    queries: list[str],
    corpus: list[str],
    concurrency: int,
    service: Any,
) -> dict[str, Any]:
    def body(i: int) -> dict[str, Any]:
        if route == "/v2/rerank":
            return {"query": queries[i], "documents": corpus[i * 10 % 1990 : i * 10 % 1990 + 10]}
        return {"input": queries[i], "input_type": "query"}

    client.post(url + route, json=body(0)).raise_for_status()  # warm-up
    model = "reranker" if route == "/v2/rerank" else "embedder"
    histogram = service.metrics.batch_items.labels(model)
    items0, batches0 = histogram._sum.get(), sum(b.get() for b in histogram._buckets)

    def one(i: int) -> float:
        started = time.perf_counter()
        client.post(url + route, json=body(i)).raise_for_status()
        return (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(len(queries))))
    elapsed = time.perf_counter() - started
    items = histogram._sum.get() - items0
    batches = sum(b.get() for b in histogram._buckets) - batches0
    return {
        "route": route,
        "concurrency": concurrency,
        "requests_per_s": round(len(queries) / elapsed, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "items_per_batch": round(items / max(batches, 1), 2),
    }


if __name__ == "__main__":
    main()
