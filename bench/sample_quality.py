"""Quality of a running service on the quickstart sample's labelled queries, system by system.

The Debian sample shipped with the package comes with 500 labelled queries (a package's
synopsis -> that package). Each goes to `/v1/search` as a chatbot would send it, once per
system: the service's default (no `recall`/`rerank` in the request) and each of `--systems`
(dense, sparse, hybrid; each without reranking). Hits are judged by document id; every
system is compared with dense recall on the same queries by a paired randomization test
(p-value) and bootstrap (95% interval) over per-query nDCG@10. Last line: one JSON object.

    twostage quickstart &                        # in another shell
    python bench/sample_quality.py --url http://127.0.0.1:8000
"""

import argparse
import gzip
import json
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_info
from twostage.training.evaluation import score_run
from twostage.training.paired import paired_test, per_query

SYSTEMS: dict[str, dict[str, Any]] = {
    "default": {},
    "dense": {"recall": "dense", "rerank": False},
    "sparse": {"recall": "sparse", "rerank": False},
    "hybrid": {"recall": "hybrid", "rerank": False},
}


def labelled_queries(limit: int) -> list[dict[str, str]]:
    raw = gzip.decompress(
        (files("twostage.api.cli") / "samples" / "debian-sample-queries.jsonl.gz").read_bytes()
    )
    return [json.loads(line) for line in raw.decode().splitlines()][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    args = parser.parse_args()

    labelled = labelled_queries(args.queries)
    qrels = {f"q{i}": {row["doc_id"]: 1} for i, row in enumerate(labelled)}
    out: dict[str, Any] = {}
    per_system: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=args.url, timeout=300) as client:
        for name in args.systems:
            run: dict[str, dict[str, float]] = {}
            seen: set[str] = set()
            started = time.perf_counter()
            for i, row in enumerate(labelled):
                body = {
                    "query": row["query"],
                    "top_k": 50,
                    "top_n": 10,
                    "group_by_doc": True,
                    **SYSTEMS[name],
                }
                answer = client.post("/v1/search", json=body).raise_for_status().json()
                seen.add(f"{answer['recall']}: " + " -> ".join(answer["stages"]))
                hits = answer["hits"]
                run[f"q{i}"] = {h["doc_id"]: float(len(hits) - h["rank"] + 1) for h in hits}
            per_system[name] = per_query(qrels, run)
            out[name] = {
                "ran": sorted(seen),
                "metrics": {k: round(v, 4) for k, v in score_run(qrels, run).items()},
                "seconds": round(time.perf_counter() - started, 1),
            }
    if "dense" in per_system:
        for name, scores in per_system.items():
            if name != "dense":
                out[name]["vs_dense_nDCG@10"] = paired_test(per_system["dense"], scores).as_dict()
    print(json.dumps({
        "bench": "sample_quality", "url": args.url, "queries": len(labelled), "systems": out,
        **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
