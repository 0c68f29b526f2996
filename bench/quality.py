"""Retrieval quality on debian-ir with models really trained here: base vs fine-tuned, dense vs
BM25 vs hybrid, with and without a reranker, every comparison paired over the same queries.

Systems, all evaluated on dev queries with the corpus as distractors (see the data README):
  base-dense / base-bm25 / base-hybrid   all-MiniLM-L6-v2 as shipped; Qdrant Edge BM25; both
                                         fused by RRF (k 60), as `/v1/search` runs them
  finetuned-dense / finetuned-hybrid     MiniLM fine-tuned on train pairs with mined hard
                                         negatives (MNRL; `--mask-false-negatives` adds a
                                         second embedder trained with in-batch false negatives
                                         masked, GISTEmbedLoss with the model as its guide,
                                         reported as finetuned-gist-*)
  finetuned-hybrid+reranker              that hybrid top-K reranked by a cross-encoder trained
                                         from the fine-tuned embedder's encoder on negatives the
                                         fine-tuned embedder mines (its mistakes); `--reranker
                                         yes-no` trains SmolLM2-135M on the Qwen3 yes/no logit.
                                         Ordered as served (TWOSTAGE_RERANKER__FUSION: the
                                         reranker's rank fused with the recall rank by RRF);
                                         `...+reranker-alone` orders by the reranker alone
Recall runs in a throwaway Qdrant Edge shard with exact dense search (training.evaluation).
Relevance is by document id; `paired` holds, for each comparison, the per-query nDCG@10 gain
with its 95% bootstrap interval and randomization p-value (training.paired).
`--save DIR` writes the fine-tuned embedder and reranker as servable model directories
(DIR/embedder, DIR/reranker): `twostage evaluate --beir ...` with TWOSTAGE_EMBEDDER__MODEL and
TWOSTAGE_RERANKER__MODEL pointing there evaluates them on another BEIR set. `--load DIR`
evaluates such a pair again without training it (with `--mask-false-negatives`, the GIST
embedder is still trained, for its comparison with the loaded MNRL one).
Last line: one JSON object.

    python bench/quality.py                         # the measured defaults (~75 min on 2 cores)
    python bench/quality.py --load DIR --mask-false-negatives   # saved pair + the GIST embedder
    python bench/quality.py --train-pairs 64 --rerank-pairs 16 --dev 20 --distractors 500 \\
        --embed-batch 16 --rerank-batch 4   # smoke
"""

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.api.settings import Settings
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.search.two_stage import served_fusion
from twostage.retrieval.store.sparse import Rrf
from twostage.training.data import Example, Pair
from twostage.training.embedder_training import EmbedderTrainSettings, train_embedder
from twostage.training.evaluation import best, from_pairs, fused_run, recall_runs, rerank_run, score_run
from twostage.training.mining import MiningSettings, mine
from twostage.training.paired import paired_test, per_query
from twostage.training.reranker_families import fine_tune_reranker
from twostage.training.reranker_training import RerankerTrainSettings
from twostage.training.st_model import load_st_embedder

EMBEDDER = "pypi:all-MiniLM-L6-v2"
RERANKERS = {"yes-no": "pypi:SmolLM2-135M-Instruct", "cross-encoder": EMBEDDER}
Run = dict[str, dict[str, float]]
COMPARISONS = [  # (baseline, candidate)
    ("base-dense", "base-bm25"), ("base-dense", "base-hybrid"), ("base-dense", "finetuned-dense"),
    ("base-hybrid", "finetuned-hybrid"), ("finetuned-dense", "finetuned-hybrid"),
    ("finetuned-hybrid", "finetuned-hybrid+reranker"), ("finetuned-dense", "finetuned-hybrid+reranker"),
    ("finetuned-hybrid", "finetuned-hybrid+reranker-alone"),
    ("finetuned-hybrid+reranker-alone", "finetuned-hybrid+reranker"),
    ("finetuned-dense", "finetuned-gist-dense"), ("finetuned-hybrid", "finetuned-gist-hybrid"),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-pairs", type=int, default=2000, help="embedder training pairs")
    parser.add_argument("--embed-batch", type=int, default=64, help="MNRL batch (in-batch negatives)")
    parser.add_argument("--embed-lr", type=float, default=5e-5)
    parser.add_argument("--mask-false-negatives", action="store_true", help="also train the GIST embedder")
    parser.add_argument("--reranker", choices=sorted(RERANKERS), default="cross-encoder")
    parser.add_argument("--rerank-pairs", type=int, default=4300, help="reranker training groups")
    parser.add_argument("--rerank-negatives", type=int, default=3, help="negatives per reranker group")
    parser.add_argument("--rerank-batch", type=int, default=32, help="groups (cross-encoder: pairs) per step")
    parser.add_argument("--rerank-lr", type=float, default=1e-4)
    parser.add_argument("--rerank-epochs", type=float, default=1.0)
    parser.add_argument(
        "--rerank-max-length", type=int, default=192, help="reranker tokens, in training and at inference"
    )
    parser.add_argument(
        "--rerank-init", choices=["base", "embedder"], default="embedder",
        help="cross-encoder start: the shipped MiniLM, or the fine-tuned embedder's encoder",
    )  # fmt: skip
    parser.add_argument("--dev", type=int, default=300, help="dev queries evaluated")
    parser.add_argument(
        "--distractors", type=int, default=20000, help="corpus documents added as distractors"
    )
    parser.add_argument("--top-k", type=int, default=10, help="hybrid candidates the reranker sees")
    parser.add_argument("--rrf-k", type=int, default=60)
    parser.add_argument("--base-only", action="store_true", help="only base dense, BM25 and hybrid")
    parser.add_argument("--save", type=Path, help="write the trained models to SAVE/embedder, SAVE/reranker")
    parser.add_argument(
        "--load", type=Path,
        help="evaluate LOAD/embedder and LOAD/reranker (an earlier --save) instead of training them",
    )  # fmt: skip
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_rows = read_jsonl(DATA / "train.jsonl")
    if args.train_pairs + args.rerank_pairs > len(train_rows) - 100:  # the last 100 are the trainers' dev
        parser.error(f"--train-pairs + --rerank-pairs must be at most {len(train_rows) - 100}")

    rng = random.Random(args.seed)
    rng.shuffle(train_rows)
    dev_rows = read_jsonl(DATA / "dev.jsonl")[: args.dev]
    distractors = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", args.distractors)]
    # the dev positives plus the corpus, one id per distinct text; relevance is by that id
    data = from_pairs([Pair(r["query"], r["positive"]) for r in dev_rows], distractors)
    cache = Path(args.cache_dir)
    settings = Settings(
        embedder={"model": EMBEDDER},
        reranker={"model": RERANKERS[args.reranker], "max_length": args.rerank_max_length},
        cache_dir=cache,
    )
    rrf = Rrf(args.rrf_k)
    results: dict[str, Any] = {}
    runs: dict[str, Run] = {}
    started = time.perf_counter()

    def record(name: str, run: Run, seconds: float) -> None:
        metrics = score_run(data.qrels, run)
        runs[name] = run
        results[name] = {
            "ndcg@10": round(metrics["nDCG@10"], 4), "mrr@10": round(metrics["RR@10"], 4),
            "recall@10": round(metrics["R@10"], 4), "recall@100": round(metrics["R@100"], 4),
            "wall_s": round(seconds, 1),
        }  # fmt: skip
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)

    def paired_tests() -> dict[str, dict[str, float | int]]:
        """Each comparison both of whose systems ran: per-query nDCG@10, paired."""
        out = {}
        for baseline, candidate in COMPARISONS:
            if baseline in runs and candidate in runs:
                compared = paired_test(
                    per_query(data.qrels, runs[baseline]), per_query(data.qrels, runs[candidate])
                )
                out[f"{candidate} vs {baseline}"] = compared.as_dict()
        return out

    numerics: dict[str, str] = {}  # the numeric path each evaluated model ran on (dtype=auto may pick bf16)

    def recall_systems(prefix: str, embedder: Any, modes: tuple[Any, ...]) -> dict[str, Run]:
        numerics[f"{prefix} embedder"] = embedder.numerics
        t = time.perf_counter()
        out = recall_runs(data, embedder, modes, top_k=100, instruction=None, rrf=rrf)
        for mode, run in out.items():
            record(f"{prefix}-{'bm25' if mode == 'sparse' else mode}", run, time.perf_counter() - t)
        return out

    recall_systems("base", load_embedder(settings), ("dense", "sparse", "hybrid"))
    if args.base_only:  # the untrained systems: minutes, where the whole bench takes over an hour
        print(json.dumps({
            "bench": "quality", "embedder": EMBEDDER, "results": results, "paired_nDCG@10": paired_tests(),
            "sizes": {"dev_queries": len(data.queries), "corpus": len(data.corpus)},
            "settings": {k: str(v) for k, v in vars(args).items() if k != "cache_dir"},
            "wall_s": round(time.perf_counter() - started, 1), **run_info("cpu"),
        }))  # fmt: skip
        return

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        t = time.perf_counter()
        pairs = [Pair(r["query"], r["positive"]) for r in train_rows[: args.train_pairs]]
        held = [
            Pair(r["query"], r["positive"]) for r in train_rows[-100:]
        ]  # trainer's own dev, not the bench's
        base_path = resolve_model(EMBEDDER, cache_dir=cache).path
        mining_corpus = [r["positive"] for r in train_rows[: args.train_pairs + args.rerank_pairs]]
        mined: list[Pair] = []
        if not args.load or args.mask_false_negatives:  # an embedder is trained: the base model mines
            miner = load_st_embedder(base_path, settings)
            mined = mine(pairs, mining_corpus, miner, MiningSettings(num_negatives=1, range_min=1))
        train_s: dict[str, float] = {}
        embed_reports: dict[str, dict[str, Any]] = {}

        def fine_tune(prefix: str, gist: bool) -> tuple[Settings, Run]:
            """An embedder trained from the shipped MiniLM, and its recall systems."""
            t = time.perf_counter()
            options = EmbedderTrainSettings(
                epochs=1, batch_size=args.embed_batch, learning_rate=args.embed_lr, lora=False, eval_steps=20,
                mask_false_negatives=gist,
            )  # fmt: skip
            model = load_st_embedder(base_path, settings)
            embed_reports[prefix] = train_embedder(
                model, mined, held, run_dir / prefix, options, app=settings
            )
            train_s[prefix] = round(time.perf_counter() - t, 1)
            tuned = settings.model_copy(deep=True)
            tuned.embedder.model = embed_reports[prefix]["model_dir"]
            return tuned, recall_systems(prefix, load_embedder(tuned), ("dense", "hybrid"))["hybrid"]

        def train_reranker(tuned: Settings) -> tuple[str, dict[str, Any], RerankerTrainSettings, list[Pair]]:
            """A reranker trained on negatives the fine-tuned embedder mines; `tuned` is pointed at it."""
            t = time.perf_counter()
            rr_pairs = [
                Pair(r["query"], r["positive"])
                for r in train_rows[args.train_pairs : args.train_pairs + args.rerank_pairs]
            ]
            tuned_st = load_st_embedder(Path(embed_reports["finetuned"]["model_dir"]), settings)
            rr_mining = MiningSettings(num_negatives=args.rerank_negatives, range_min=0, range_max=20)
            rr_mined = mine(rr_pairs, mining_corpus, tuned_st, rr_mining)
            cross_encoder = args.reranker == "cross-encoder"
            reranker_name = RERANKERS[args.reranker]
            source = resolve_model(reranker_name, cache_dir=cache).path
            if cross_encoder and args.rerank_init == "embedder":
                source, reranker_name = (
                    Path(embed_reports["finetuned"]["model_dir"]),
                    f"{EMBEDDER}, fine-tuned as embedder",
                )
            rr_train: list[Example] = list(rr_mined)
            rr_dev: list[Example] = list(mine(held[:32], mining_corpus, tuned_st, rr_mining))
            rr_options = RerankerTrainSettings(
                epochs=args.rerank_epochs, batch_size=args.rerank_batch, learning_rate=args.rerank_lr,
                eval_steps=50 if cross_encoder else 15, loss="bce" if cross_encoder else "listwise",
                group_negatives=args.rerank_negatives,
            )  # fmt: skip
            rr_report = fine_tune_reranker(
                source, args.reranker, rr_train, rr_dev, run_dir / "rr", rr_options,
                instruction=settings.reranker.instruction, max_length=settings.reranker.max_length,
                device="cpu",
            )  # fmt: skip
            train_s["reranker"] = round(time.perf_counter() - t, 1)
            tuned.reranker.model = rr_report["model_dir"]
            return reranker_name, rr_report, rr_options, rr_mined

        if args.load:  # an earlier run's models: the systems' figures without their training
            tuned_settings = settings.model_copy(deep=True)
            tuned_settings.embedder.model = str(args.load / "embedder")
            tuned_settings.reranker.model = str(args.load / "reranker")
            tuned_hybrid = recall_systems("finetuned", load_embedder(tuned_settings), ("dense", "hybrid"))[
                "hybrid"
            ]
            reranker_name, rr_report, rr_options, rr_mined = str(args.load / "reranker"), None, None, []
        else:
            tuned_settings, tuned_hybrid = fine_tune("finetuned", gist=False)
            reranker_name, rr_report, rr_options, rr_mined = train_reranker(tuned_settings)

        t = time.perf_counter()
        head = best(tuned_hybrid, args.top_k)
        reranker = load_reranker(tuned_settings)
        numerics["reranker"] = reranker.numerics
        scores = rerank_run(data, head, reranker, None)
        seconds = time.perf_counter() - t
        record("finetuned-hybrid+reranker", fused_run(head, scores, served_fusion(settings)), seconds)
        record("finetuned-hybrid+reranker-alone", fused_run(head, scores, None), seconds)
        if args.save and rr_report is not None:
            for part, path in (
                ("embedder", embed_reports["finetuned"]["model_dir"]),
                ("reranker", rr_report["model_dir"]),
            ):
                shutil.rmtree(args.save / part, ignore_errors=True)
                shutil.copytree(path, args.save / part)
        if args.mask_false_negatives:  # last: the figures above do not wait for it
            print(
                json.dumps({"so_far": {"results": results, "paired_nDCG@10": paired_tests()}}),
                file=sys.stderr,
                flush=True,
            )
            fine_tune("finetuned-gist", gist=True)

    paired = paired_tests()
    relative = {
        f"{c} vs {b}": round(results[c]["ndcg@10"] / results[b]["ndcg@10"] - 1, 4)
        for b, c in COMPARISONS if b in results and c in results
    }  # fmt: skip
    print(json.dumps({
        "bench": "quality", "embedder": EMBEDDER, "reranker": reranker_name,
        "reranker_kind": args.reranker, "results": results, "paired_nDCG@10": paired,
        "relative_nDCG@10": relative,
        "sizes": {"train_pairs": len(mined), "rerank_pairs": len(rr_mined), "dev_queries": len(data.queries),
                  "corpus": len(data.corpus), "top_k": args.top_k},
        "train_s": train_s, "numerics": numerics,
        "reranker_dev_loss": rr_report and rr_options and {
            "base": rr_report["base_dev_loss"], "best": rr_report["best_dev_loss"], "loss": rr_options.loss,
            "group": 1 + args.rerank_negatives},
        "loaded": str(args.load) if args.load else None,
        "saved": str(args.save) if args.save else None,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "cache_dir"},
        "wall_s": round(time.perf_counter() - started, 1), **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
