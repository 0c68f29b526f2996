"""Searches and feedback under load: one replica on SQLite, then one and two on PostgreSQL.

Each client (a thread; 16 per replica, in a client process of their own per replica so the
clients do not share one interpreter lock) searches a dev-set query, then sends a click on the
top hit with its own `event_id`, back to back for `--seconds`; with two replicas the feedback
goes to the replica that did not answer (what a load balancer does to a chatbot's requests).
Replicas are `twostage serve` subprocesses with their own data directories over copies of one
ingested index (the embedded store is one process's; a Qdrant server would be shared) and one
log: SQLite in the data directory, or one PostgreSQL server started here (Debian's package, as
the tests start it). Afterwards the log is read back: events acknowledged (the sum of
`accepted`) must equal events stored. Last line: one JSON object.

    python bench/feedback_load.py                 # ~5 min on 2 cores
    python bench/feedback_load.py --seconds 20 --clients 8
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

from bench.common import DATA, in_threads, read_jsonl, run_info  # noqa: E402
from bench.search_load import free_port, start_server  # noqa: E402

KEY = "bench"


def client_run(search_url: str, feedback_url: str, clients: int, seconds: float, tag: str) -> dict[str, Any]:
    """`clients` threads: a search, then a click on its top hit; latencies, acknowledged, errors."""
    queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl", 500)]
    searches: list[float] = []
    feedback: list[float] = []
    acknowledged = unlogged = 0
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {KEY}"}

    def client(k: int) -> None:
        nonlocal acknowledged, unlogged
        with httpx.Client(timeout=120, headers=headers) as http:
            i = k
            while time.monotonic() < stop:
                started = time.perf_counter()
                answer = http.post(search_url + "/v1/search", json={"query": queries[i % len(queries)]})
                searched = time.perf_counter()
                if answer.status_code != 200:
                    with lock:
                        errors.append(f"search {answer.status_code}")
                    continue
                body = answer.json()
                if body["search_id"] is None or not body["hits"]:
                    with lock:
                        unlogged += body["search_id"] is None
                        searches.append((searched - started) * 1000)
                    continue
                event = {"search_id": body["search_id"], "id": body["hits"][0]["id"], "event": "click",
                         "event_id": f"{tag}-{k}-{i}"}  # fmt: skip
                sent = time.perf_counter()
                told = http.post(feedback_url + "/v1/feedback", json={"events": [event]})
                done = time.perf_counter()
                with lock:
                    searches.append((searched - started) * 1000)
                    if told.status_code == 200:
                        acknowledged += told.json()["accepted"]
                        feedback.append((done - sent) * 1000)
                    else:
                        errors.append(f"feedback {told.status_code}")
                i += clients

    wall = in_threads(client, clients)
    return {"searches": len(searches), "wall_s": wall, "search_ms": searches, "feedback_ms": feedback,
            "acknowledged": acknowledged, "unlogged": unlogged, "errors": errors}  # fmt: skip


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_config(
    name: str, env: dict[str, str], data: list[Path], url: str | None, clients: int, seconds: float, log: Path
) -> dict[str, Any]:
    """Serve one replica per data directory on the log `url` (None: SQLite), drive, count."""
    servers = []
    try:
        for data_dir in data:
            replica_env = {**env, "TWOSTAGE_DATA_DIR": str(data_dir), "TWOSTAGE_API__PORT": str(free_port()),
                           "TWOSTAGE_FEEDBACK__DATABASE_URL": url or ""}  # fmt: skip
            servers.append(start_server(replica_env, log))
        urls = [u for _, u in servers]
        for u in urls:  # warm up: the first search loads the models
            httpx.post(u + "/v1/search", json={"query": "warm up"}, timeout=300,
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        drivers = []
        for i, u in enumerate(urls):  # feedback to the next replica: the one that did not answer
            command = [sys.executable, __file__, "--client", u, urls[(i + 1) % len(urls)], "--clients",
                       str(clients), "--seconds", str(seconds), "--tag", f"{name}{i}"]  # fmt: skip
            drivers.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        runs = [json.loads(d.communicate()[0].splitlines()[-1]) for d in drivers]
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(timeout=120)
    from twostage.retrieval.traffic.log import TrafficLog
    from twostage.retrieval.traffic.settings import FeedbackSettings

    stored_log = TrafficLog(data[0], FeedbackSettings(database_url=url))
    stored = len(stored_log.events())
    logged = len(stored_log.searches())
    stored_log.close()
    search_ms = [x for r in runs for x in r["search_ms"]]
    feedback_ms = [x for r in runs for x in r["feedback_ms"]]
    wall = max(r["wall_s"] for r in runs)
    acknowledged = sum(r["acknowledged"] for r in runs)
    errors = [e for r in runs for e in r["errors"]]
    return {
        "replicas": len(data), "clients": clients * len(data), "log": "postgresql" if url else "sqlite",
        "searches": len(search_ms), "searches_per_s": round(len(search_ms) / wall, 2),
        "search_p50_ms": _percentile(search_ms, 50), "search_p99_ms": _percentile(search_ms, 99),
        "feedback_p50_ms": _percentile(feedback_ms, 50), "feedback_p99_ms": _percentile(feedback_ms, 99),
        "searches_logged": logged, "events_acknowledged": acknowledged, "events_stored": stored,
        "acknowledged_equals_stored": acknowledged == stored,
        "unlogged_searches": sum(r["unlogged"] for r in runs),
        "errors": len(errors), "error_kinds": sorted(set(errors)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16, help="per replica")
    parser.add_argument("--seconds", type=float, default=60.0, help="per configuration")
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument("--client", nargs=2, metavar=("SEARCH_URL", "FEEDBACK_URL"), help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="c", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:  # one replica's clients, in a process of their own
        print(json.dumps(client_run(*args.client, args.clients, args.seconds, args.tag)))
        return

    from postgres import remove, start_postgres

    corpus = read_jsonl(DATA / "corpus.jsonl", args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TWOSTAGE_")},
            "TWOSTAGE_CACHE_DIR": str(Path(args.cache_dir).resolve()),
            "TWOSTAGE_EMBEDDER__MODEL": args.embedder, "TWOSTAGE_SEARCH__RERANK": "false",
            "TWOSTAGE_RERANKER__MODEL": "pypi:SmolLM2-135M-Instruct",  # offline; not trained to rank: off
            "TWOSTAGE_API__API_KEYS": json.dumps([KEY]),
            # a load test, not a rate-limit test
            "TWOSTAGE_FEEDBACK__RATE_PER_S": "100000", "TWOSTAGE_FEEDBACK__BURST": "100000",
            "HF_HUB_OFFLINE": "1",
        }  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "twostage.api.cli", "ingest", str(base / "corpus.jsonl"), "--quiet"],
            env={**env, "TWOSTAGE_DATA_DIR": str(base / "index")}, check=True, stdout=sys.stderr,
        )  # fmt: skip

        def data_dirs(name: str, n: int) -> list[Path]:
            made = []
            for i in range(n):
                target = base / f"{name}-{i}"
                shutil.copytree(base / "index", target)
                made.append(target)
            return made

        results: dict[str, Any] = {}
        log = base / "servers.log"
        results["sqlite_1"] = run_config(
            "s", env, data_dirs("sqlite", 1), None, args.clients, args.seconds, log
        )
        print("sqlite_1", json.dumps(results["sqlite_1"]), file=sys.stderr, flush=True)
        server = start_postgres(fsync=True)  # a production server's durability
        try:
            for name, n in (("postgresql_1", 1), ("postgresql_2", 2)):
                url = server.new_database()
                results[name] = run_config(
                    name[-1], env, data_dirs(name, n), url, args.clients, args.seconds, log
                )
                print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
        finally:
            remove(server)
    sqlite, shared = results["sqlite_1"], results["postgresql_2"]
    print(json.dumps({
        "bench": "feedback_load", "embedder": args.embedder, "docs": args.docs, "rerank": False,
        "clients_per_replica": args.clients, "seconds": args.seconds, "results": results,
        "postgresql_2_vs_sqlite_1": {
            "searches_per_s": round(shared["searches_per_s"] / sqlite["searches_per_s"], 2),
            "feedback_p99": round(shared["feedback_p99_ms"] / sqlite["feedback_p99_ms"], 2),
        },
        "all_acknowledged_stored": all(r["acknowledged_equals_stored"] for r in results.values()),
        "errors": sum(r["errors"] for r in results.values()),
        "postgres": "15, fsync on, synchronous_commit on (defaults); sqlite: WAL, synchronous=NORMAL",
        **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
