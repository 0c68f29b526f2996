"""Quality of a running service on the quickstart sample's labelled queries.

The Debian sample shipped with the package comes with 500 labelled queries (a package's
synopsis -> that package). This sends each to `/v1/search` as a chatbot would (the
service's default stages unless `--rerank`/`--no-rerank`) and scores the hits by document id
with ir_measures. Last line: one JSON object.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--queries", type=int, default=500)
    rerank = parser.add_mutually_exclusive_group()
    rerank.add_argument("--rerank", dest="rerank", action="store_true", default=None)
    rerank.add_argument("--no-rerank", dest="rerank", action="store_false")
    args = parser.parse_args()

    raw = gzip.decompress((files("twostage.api") / "samples" / "debian-sample-queries.jsonl.gz").read_bytes())
    labelled = [json.loads(line) for line in raw.decode().splitlines()][: args.queries]
    qrels = {f"q{i}": {row["doc_id"]: 1} for i, row in enumerate(labelled)}
    run: dict[str, dict[str, float]] = {}
    stages: set[str] = set()
    started = time.perf_counter()
    with httpx.Client(base_url=args.url, timeout=300) as client:
        for i, row in enumerate(labelled):
            body: dict[str, Any] = {"query": row["query"], "top_k": 50, "top_n": 10, "group_by_doc": True}
            if args.rerank is not None:
                body["rerank"] = args.rerank
            answer = client.post("/v1/search", json=body).raise_for_status().json()
            stages.add(" -> ".join(answer["stages"]))
            hits = answer["hits"]
            run[f"q{i}"] = {h["doc_id"]: float(len(hits) - h["rank"] + 1) for h in hits}
    metrics = score_run(qrels, run)
    print(json.dumps({
        "bench": "sample_quality", "url": args.url, "queries": len(labelled), "stages": sorted(stages),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "seconds": round(time.perf_counter() - started, 1),
        **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
