"""Calibrated relevance on debian-ir: fitted on some dev queries, judged on others.

Two deployments, each searched as `/v1/search` serves it by default:
  base-hybrid          all-MiniLM-L6-v2 as shipped, BM25 + dense fused by RRF (k 60); no reranker
  finetuned-two-stage  a fine-tuned MiniLM's hybrid recall, its first `--rerank-k` (5, the
                       service's default) reranked by a cross-encoder trained here and ordered by
                       the reranker's rank fused with the recall rank (the served default), the
                       rest in recall order

The dev queries are split by a hash of the query into a fitting half and a held-out half
(never the fitting ones). The calibration (`training.calibration.fit_calibration`, the code
`twostage retrain` and `twostage calibrate` run) is fitted on the top 10 of each fitting query
and judged on the held-out queries' top 10: ECE over 10 equal-width bins and the Brier score.
"Answerable": a query whose relevant document is in its top 10; with `min_relevance` 0.5 a
query is answered when its top hit's relevance reaches 0.5, against the same threshold on the
raw score the hit was served by (the RRF score for recall, the reranker's probability).

The fine-tuned pair comes from `bench/quality.py --save DIR` (`--models DIR`); without it, this
script runs `bench/quality.py` with a small budget to train and save one first. Last line: one
JSON object.

    python bench/calibration.py                      # trains a small pair first (~25 min on 2 cores)
    python bench/calibration.py --models runs/models # a pair saved by bench/quality.py --save
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.api.settings import Settings
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.fusion import RerankFusion, rerank_order
from twostage.retrieval.search.two_stage import SearchPlan
from twostage.retrieval.store.sparse import Rrf
from twostage.training.calibration import Observation, fit_calibration, reliability
from twostage.training.data import Pair
from twostage.training.evaluation import EvalSet, best, from_pairs, recall_runs, rerank_run

EMBEDDER = "pypi:all-MiniLM-L6-v2"
DEPTH = 10


def fitting_half(query: str) -> bool:
    return hashlib.sha256(query.encode()).digest()[0] < 128


def served_hits(
    data: EvalSet,
    hybrid: dict[str, dict[str, float]],
    scores: dict[str, dict[str, float]] | None,
    rerank_k: int,
    fusion: RerankFusion,
) -> dict[str, list[tuple[str, float, float | None]]]:
    """Each query's top DEPTH as served: (doc, recall score, reranker score or None), best first."""
    out = {}
    for qid, docs in hybrid.items():
        ordered = sorted(docs, key=lambda d: -docs[d])
        if scores is None:
            out[qid] = [(d, docs[d], None) for d in ordered[:DEPTH]]
            continue
        head = ordered[:rerank_k]
        order = rerank_order([scores[qid][d] for d in head], fusion)
        ranking = [(head[i], docs[head[i]], scores[qid][head[i]]) for i in order]
        out[qid] = (ranking + [(d, docs[d], None) for d in ordered[rerank_k:]])[:DEPTH]
    return out


def judge(
    name: str,
    data: EvalSet,
    hits: dict[str, list[tuple[str, float, float | None]]],
    plan: SearchPlan,
    settings: Settings,
) -> dict[str, Any]:
    """Fit on the fitting half, judge on the held-out half."""
    fit: list[Observation] = []
    held: dict[str, list[Observation]] = {}
    for n, (qid, ranking) in enumerate(hits.items()):
        observed = [
            Observation(n, rank, recall, rerank, doc in data.qrels[qid])
            for rank, (doc, recall, rerank) in enumerate(ranking, start=1)
        ]
        if fitting_half(data.queries[qid]):
            fit += observed
        else:
            held[qid] = observed
    calibration: Calibration = fit_calibration(fit, plan, settings, f"{name}: fitting half of debian-ir dev")
    predicted, labels = [], []
    answerable, by_relevance, by_raw = [], [], []
    for observed in held.values():
        relevance = [calibration.relevance(o.rank, o.recall_score, o.rerank_score) or 0.0 for o in observed]
        predicted += relevance
        labels += [float(o.relevant) for o in observed]
        answerable.append(any(o.relevant for o in observed))
        by_relevance.append(bool(relevance) and relevance[0] >= 0.5)
        top = observed[0] if observed else None
        raw = 0.0 if top is None else (top.rerank_score if top.rerank_score is not None else top.recall_score)
        by_raw.append(raw >= 0.5)
    figures = reliability(np.array(predicted), np.array(labels), queries=len(held))

    def precision_recall(decided: list[bool]) -> dict[str, float | int]:
        hits_ = sum(1 for a, d in zip(answerable, decided, strict=True) if a and d)
        answered = sum(decided)
        return {"answered": answered, "precision": round(hits_ / answered, 4) if answered else 0.0,
                "recall": round(hits_ / max(1, sum(answerable)), 4)}  # fmt: skip

    return {
        "fit": {"queries": len(hits) - len(held), "judgements": len(fit),
                "ece_held_out_folds": calibration.reliability.ece},
        "test": {"queries": len(held), "judgements": len(labels), "ece": figures.ece, "brier": figures.brier,
                 "positives": figures.positives, "answerable": sum(answerable)},
        "min_relevance_0.5": precision_recall(by_relevance),
        "raw_score_0.5": precision_recall(by_raw),
        "reliability_bins": [b.model_dump() for b in figures.bins],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="DIR/embedder and DIR/reranker (bench/quality.py --save)")
    parser.add_argument("--dev", type=int, default=1000, help="dev queries (half fit, half held out)")
    parser.add_argument("--distractors", type=int, default=5000, help="corpus documents added")
    parser.add_argument("--top-k", type=int, default=50, help="hybrid candidates (the service's default)")
    parser.add_argument("--rerank-k", type=int, default=5, help="reranked candidates (search.rerank_k)")
    parser.add_argument("--cache-dir", default=".twostage/cache")
    args = parser.parse_args()
    started = time.perf_counter()
    trained: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:  # a small fine-tuned pair, trained by the quality bench
            models = Path(tmp) / "models"
            command = [sys.executable, str(Path(__file__).with_name("quality.py")), "--train-pairs", "640",
                       "--embed-batch", "32", "--rerank-pairs", "400", "--rerank-batch", "16", "--dev", "20",
                       "--distractors", "200", "--save", str(models),
                       "--cache-dir", args.cache_dir]  # fmt: skip
            t = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            trained = {"command": " ".join(command[1:]), "wall_s": round(time.perf_counter() - t, 1)}
        dev = read_jsonl(DATA / "dev.jsonl")[: args.dev]
        distractors = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", args.distractors)]
        data = from_pairs([Pair(r["query"], r["positive"]) for r in dev], distractors)
        settings = Settings(embedder={"model": EMBEDDER}, cache_dir=Path(args.cache_dir), device="cpu")
        rrf, fusion = Rrf(60), RerankFusion()
        results = {}
        base = recall_runs(
            data, load_embedder(settings), ["hybrid"], top_k=args.top_k, instruction=None, rrf=rrf
        )
        results["base-hybrid"] = judge(
            "base-hybrid", data, served_hits(data, base["hybrid"], None, args.rerank_k, fusion),
            SearchPlan("hybrid", False, rrf), settings,
        )  # fmt: skip
        tuned = settings.model_copy(deep=True)
        tuned.embedder.model, tuned.reranker.model = str(models / "embedder"), str(models / "reranker")
        hybrid = recall_runs(
            data, load_embedder(tuned), ["hybrid"], top_k=args.top_k, instruction=None, rrf=rrf
        )
        scores = rerank_run(data, best(hybrid["hybrid"], args.rerank_k), load_reranker(tuned), None)
        results["finetuned-two-stage"] = judge(
            "finetuned-two-stage", data, served_hits(data, hybrid["hybrid"], scores, args.rerank_k, fusion),
            SearchPlan("hybrid", True, rrf, fusion=fusion, rerank_k=args.rerank_k), settings,
        )  # fmt: skip
    print(json.dumps({
        "bench": "calibration", "embedder": EMBEDDER,
        "models": str(args.models) if args.models else "trained here",
        "trained": trained, "results": results,
        "target_met": all(r["test"]["ece"] <= 0.05 for r in results.values()),
        "sizes": {"dev_queries": len(data.queries), "corpus": len(data.corpus)},
        "settings": {k: str(v) for k, v in vars(args).items() if k != "cache_dir"},
        "wall_s": round(time.perf_counter() - started, 1), **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
