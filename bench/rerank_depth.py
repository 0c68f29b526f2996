"""Rerank depth (`rerank_k`): nDCG@10 and rerank latency per depth, on debian-ir dev.

Hybrid recall (the service's default first stage) of the top `--recall-k` chunks, then the
reranker sees the first `rerank_k` of them (ordered as served: by default the reranker's rank
fused with the recall rank; `--fusion none`: the reranker alone) and the rest follow in recall
order, exactly as `/v1/search` does. A document's score does not depend on the others in the call, so each
query's top `--recall-k` are scored once for the quality figures; latency is timed per depth
on `--timed` queries with calls of exactly that many documents. Each depth is compared with
the deepest and with recall alone by a paired test over per-query nDCG@10. Last line: one JSON
object, with `suggested_default`: the smallest depth not significantly worse than the deepest.

    python bench/rerank_depth.py --embedder DIR/embedder --reranker DIR/reranker  # quality.py --save DIR
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.api.settings import Settings
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.search.two_stage import served_fusion
from twostage.retrieval.store.sparse import Rrf
from twostage.training.data import Pair
from twostage.training.evaluation import from_pairs, fused_run, recall_runs, rerank_run, score_run
from twostage.training.paired import paired_test, per_query

Run = dict[str, dict[str, float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--reranker", required=True, help="a trained reranker (e.g. bench/quality.py --save)")
    parser.add_argument("--depths", default="5,10,20,30,50")
    parser.add_argument("--recall-k", type=int, default=50, help="chunks recalled (the API's top_k default)")
    parser.add_argument("--dev", type=int, default=300)
    parser.add_argument("--distractors", type=int, default=20000)
    parser.add_argument("--timed", type=int, default=40, help="queries timed per depth")
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument(
        "--fusion", choices=("rrf", "none"), help="rerank order (default: served, TWOSTAGE_RERANKER__FUSION)"
    )
    args = parser.parse_args()
    depths = sorted(int(d) for d in args.depths.split(","))
    if depths[-1] > args.recall_k:
        parser.error("every depth must be at most --recall-k")

    started = time.perf_counter()
    dev = read_jsonl(DATA / "dev.jsonl")[: args.dev]
    distractors = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", args.distractors)]
    data = from_pairs([Pair(r["query"], r["positive"]) for r in dev], distractors)
    settings = Settings(
        embedder={"model": args.embedder}, reranker={"model": args.reranker}, cache_dir=Path(args.cache_dir)
    )
    recall = recall_runs(data, load_embedder(settings), ("hybrid",), top_k=args.recall_k, instruction=None,
                         rrf=Rrf(60))["hybrid"]  # fmt: skip
    reranker = load_reranker(settings)
    scores = rerank_run(data, recall, reranker, None)
    fusion = served_fusion(settings, args.fusion)

    latency: dict[int, float] = {}
    timed = list(data.queries)[: args.timed]
    for depth in depths:
        per_call = []
        for qid in timed:
            docs = [data.corpus[d] for d in sorted(recall[qid], key=lambda d: -recall[qid][d])[:depth]]
            t = time.perf_counter()
            reranker.score(data.queries[qid], docs)
            per_call.append((time.perf_counter() - t) * 1000)
        latency[depth] = statistics.median(per_call)

    deepest = per_query(data.qrels, fused_run(recall, scores, fusion, depths[-1]))
    alone = per_query(data.qrels, recall)
    rows: dict[str, Any] = {"recall only": {"ndcg@10": round(score_run(data.qrels, recall)["nDCG@10"], 4)}}
    suggested, worse = depths[-1], False
    for depth in reversed(depths):
        run = per_query(data.qrels, fused_run(recall, scores, fusion, depth))
        vs_deepest = paired_test(deepest, run)
        rows[str(depth)] = {
            "ndcg@10": round(statistics.fmean(run.values()), 4), "rerank_ms_p50": round(latency[depth], 1),
            "vs_deepest": vs_deepest.as_dict(), "vs_recall_only": paired_test(alone, run).as_dict(),
        }  # fmt: skip
        worse = worse or (vs_deepest.gain < 0 and vs_deepest.p_value < 0.05)
        if not worse:  # every depth from the deepest down to this one holds its quality
            suggested = depth
    print(json.dumps({
        "bench": "rerank_depth", "embedder": args.embedder, "reranker": args.reranker,
        "recall": f"hybrid top {args.recall_k}",
        "fusion": fusion.__dict__ if fusion else "none",
        "dev_queries": len(data.queries), "corpus": len(data.corpus),
        "depths": rows, "suggested_default": suggested, "wall_s": round(time.perf_counter() - started, 1),
        **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
