"""`/v1/search` throughput with the models in-process vs the same models behind a model server.

Two runs on the same debian-ir documents and dev queries, each a `twostage serve` subprocess
driven by `--clients` concurrent clients for `--seconds`:

* in-process: the API loads the models itself (as `bench/search_load.py` runs it);
* remote: a second `twostage serve` is the model server (it serves `/v1/embeddings` and
  `/v1/rerank`), and the API reaches it with `TWOSTAGE_EMBEDDER__BACKEND=remote` (and the
  reranker's, with `--rerank`); its index is built through the same remote embedder. Queries
  go with `embedder.template=server`, so the server embeds exactly what the in-process
  model does (MiniLM takes no Qwen3 instruction; `client` would prepend one).

Both processes share this machine's cores in the remote run, as an API and a model server on
one host would. Last line: one JSON object with both runs' rps and latency percentiles and
the remote/in-process ratios.

    python bench/remote_overhead.py                      # MiniLM embedder, first stage only
    python bench/remote_overhead.py --rerank --reranker tiny
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from bench.search_load import drive, free_port, start_server


def answers_embeddings(url: str) -> bool:
    """A model server has no collection (so no `/readyz`): ready once it embeds."""
    return httpx.post(url + "/v1/embeddings", json={"input": "ready?"}, timeout=30).status_code == 200


def measure(
    env: dict[str, str], base: Path, mode: str, queries: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Ingest the corpus with `env`'s models, start the API, warm it up, then drive it."""
    started = time.perf_counter()
    ingest = [sys.executable, "-m", "twostage.api.cli", "ingest", str(base / "corpus.jsonl"), "--quiet"]
    subprocess.run(ingest, env=env, check=True, stdout=sys.stderr)
    ingest_s = round(time.perf_counter() - started, 1)
    rerank = True if args.rerank else None
    server, url = start_server(env, base / f"{mode}.log")
    try:
        drive(url, queries, 4, 3, rerank)  # warm up
        result = {**drive(url, queries, args.clients, args.seconds, rerank), "ingest_s": ingest_s}
    finally:
        server.terminate()
        server.wait(timeout=120)
    print(mode, json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--reranker", default="pypi:SmolLM2-135M-Instruct", help="a model, or tiny")
    parser.add_argument("--rerank", action="store_true", help="force reranking (remote reranker too)")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cache-dir", default=".twostage/cache")
    args = parser.parse_args()

    reranker = args.reranker
    if reranker == "tiny":
        from twostage.retrieval.models.tiny import write_tiny_models

        reranker = str(write_tiny_models(Path(args.cache_dir) / "bench-tiny").reranker)
    corpus = read_jsonl(DATA / "corpus.jsonl", args.docs)
    queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl", 500)]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
        common = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TWOSTAGE_")},
            "TWOSTAGE_CACHE_DIR": str(Path(args.cache_dir).resolve()), "HF_HUB_OFFLINE": "1",
            "TWOSTAGE_EMBEDDER__MODEL": args.embedder, "TWOSTAGE_RERANKER__MODEL": reranker,
        }  # fmt: skip

        def env(mode: str, **extra: str) -> dict[str, str]:
            return {
                **common,
                **extra,
                "TWOSTAGE_DATA_DIR": str(base / mode),
                "TWOSTAGE_API__PORT": str(free_port()),
            }

        local = measure(env("in_process"), base, "in_process", queries, args)
        model_server, model_url = start_server(
            env("model-server"), base / "model-server.log", answers_embeddings
        )
        try:
            remote = {  # the model server is a twostage: it applies its model's own query prompt
                "TWOSTAGE_EMBEDDER__BACKEND": "remote",
                "TWOSTAGE_EMBEDDER__REMOTE__URL": model_url,
                "TWOSTAGE_EMBEDDER__TEMPLATE": "server",
            }
            if args.rerank:
                remote |= {
                    "TWOSTAGE_RERANKER__BACKEND": "remote",
                    "TWOSTAGE_RERANKER__REMOTE__URL": model_url,
                }
            far = measure(env("remote", **remote), base, "remote", queries, args)
        finally:
            model_server.terminate()
            model_server.wait(timeout=120)

    print(json.dumps({
        "bench": "remote_overhead", "embedder": args.embedder, "reranker": reranker,
        "rerank": "forced (remote reranker too)" if args.rerank else "service default",
        "docs": args.docs, "clients": args.clients, "seconds": args.seconds,
        "in_process": local, "remote": far,
        "rps_ratio": round(far["rps"] / local["rps"], 3),
        "p95_ratio": round(far["p95_ms"] / local["p95_ms"], 3),
        "errors": local["errors"] + far["errors"],
        **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
