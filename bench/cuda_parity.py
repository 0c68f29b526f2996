"""CUDA / bf16 check: the device=auto path picks CUDA + bf16 and still matches the recipes.

Meant for a GPU (`python bench/cuda_parity.py`, one JSON line); without one it runs the same
checks on the CPU (bf16 there where the CPU has it natively). fp32 must equal the model-card
recipe within 1e-5; bf16 (what `dtype=auto` picks on CUDA) is compared with the fp32 recipe
and with the recipe itself run in bf16, and its ranking agreement is reported, since bf16
cannot be 1e-5 exact. `bf16_throughput`: pairs/s of our bf16 reranker and of the recipe in
bf16 on the same pairs at equal batch (`--batch` pairs per forward pass for both).
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_info
from twostage.retrieval.embedder import load_embedder
from twostage.retrieval.prompts import DEFAULT_TASK, embedding_query
from twostage.retrieval.reference import recipe_embed, recipe_rerank
from twostage.retrieval.reranker import load_reranker
from twostage.retrieval.settings import Settings
from twostage.retrieval.tiny_models import TinyModelPaths, write_tiny_models


def main() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="pairs per forward pass, ours and the recipe's")
    parser.add_argument("--pairs", type=int, default=256, help="pairs timed for bf16_throughput")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp())
    paths = write_tiny_models(tmp / "models")
    query = "fast vector search library"
    docs = [f"document {i} about " + "packages and vectors " * (1 + 37 * (i % 5)) for i in range(17)]
    out: dict = {"bench": "cuda_parity", "cuda": torch.cuda.is_available()}
    ref_model = AutoModelForCausalLM.from_pretrained(paths.reranker).eval()
    ref_tok = AutoTokenizer.from_pretrained(paths.reranker)
    ref_scores = np.array(recipe_rerank(ref_model, ref_tok, [(query, d) for d in docs], DEFAULT_TASK))
    emb_model = AutoModel.from_pretrained(paths.embedder).eval()
    emb_tok = AutoTokenizer.from_pretrained(paths.embedder)
    ref_vecs = recipe_embed(emb_model, emb_tok, [embedding_query(DEFAULT_TASK, d) for d in docs]).numpy()
    cuda_ref = recipe_rerank(ref_model.to(device), ref_tok, [(query, d) for d in docs], DEFAULT_TASK)
    for dtype in ("auto", "float32"):
        settings = Settings(
            embedder={"model": str(paths.embedder)},
            reranker={"model": str(paths.reranker)},
            cache_dir=tmp / "cache",
            device=device,
            dtype=dtype,
        )
        reranker, embedder = load_reranker(settings), load_embedder(settings)
        scores = np.array(reranker.score(query, docs))
        other_query = "a much longer second query about packaging Python libraries for Debian"
        many = reranker.score_many(
            [(query, docs, None), (other_query, docs[:9], "Find the package"), ("q", [], None)]
        )
        other_ref = recipe_rerank(
            ref_model, ref_tok, [(other_query, d) for d in docs[:9]], "Find the package"
        )
        vecs = embedder.embed_queries(docs)
        model = reranker.model  # type: ignore[attr-defined]
        out[dtype] = {
            "device": str(model.device),
            "dtype": str(model.dtype),
            "rerank_max_abs_diff_vs_cpu_fp32_recipe": float(np.abs(scores - ref_scores).max()),
            "rerank_max_abs_diff_vs_cuda_fp32_recipe": float(np.abs(scores - np.array(cuda_ref)).max()),
            "rerank_same_order": bool((np.argsort(-scores) == np.argsort(-ref_scores)).all()),
            "score_many_max_abs_diff_vs_fp32_recipe": float(
                max(
                    np.abs(np.array(many[0]) - ref_scores).max(),
                    np.abs(np.array(many[1]) - np.array(other_ref)).max(),
                )
            ),
            "embed_max_abs_diff_vs_cpu_fp32_recipe": float(np.abs(vecs - ref_vecs).max()),
        }
    out["bf16"] = bf16_parity(paths, tmp, device, query, docs, ref_scores, ref_vecs, args)
    print(json.dumps({**out, **run_info(device)}))


def bf16_parity(
    paths: TinyModelPaths, tmp: Path, device: str, query: str, docs: list[str],
    ref_scores: np.ndarray, ref_vecs: np.ndarray, args: argparse.Namespace,
) -> dict[str, object]:  # fmt: skip
    """bf16 weights (explicitly asked for) against the fp32 recipe and the recipe run in bf16,
    and both in pairs/s on the same pairs at equal batch."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.reranker)
    recipe_model = (
        AutoModelForCausalLM.from_pretrained(paths.reranker, dtype=torch.bfloat16).to(device).eval()
    )
    pairs = [(query, d) for d in docs]
    recipe_bf16 = np.array(recipe_rerank(recipe_model, tokenizer, pairs, DEFAULT_TASK))
    emb_model = AutoModel.from_pretrained(paths.embedder, dtype=torch.bfloat16).to(device).eval()
    emb_tok = AutoTokenizer.from_pretrained(paths.embedder)
    texts = [embedding_query(DEFAULT_TASK, d) for d in docs]
    recipe_vecs = recipe_embed(emb_model, emb_tok, texts).float().cpu().numpy()
    longest = max(len(tokenizer.encode(d)) for d in docs) + 64  # the prompt's template and query
    settings = Settings(
        embedder={"model": str(paths.embedder)},
        reranker={"model": str(paths.reranker), "batch_tokens": args.batch * longest},  # <= --batch pairs
        cache_dir=tmp / "cache", device=device, dtype="bfloat16",
    )  # fmt: skip
    reranker, embedder = load_reranker(settings), load_embedder(settings)
    scores = np.array(reranker.score(query, docs))
    vecs = embedder.embed_queries(docs)
    cosine = (vecs * recipe_vecs).sum(1) / np.linalg.norm(recipe_vecs, axis=1)
    timed = [docs[i % len(docs)] for i in range(args.pairs)]

    def rate(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return round(args.pairs / (time.perf_counter() - started), 1)

    def recipe_all() -> None:
        for i in range(0, len(timed), args.batch):
            recipe_rerank(
                recipe_model, tokenizer, [(query, d) for d in timed[i : i + args.batch]], DEFAULT_TASK
            )

    ours_rate, recipe_rate = rate(lambda: reranker.score(query, timed)), rate(recipe_all)
    return {
        "numerics": [reranker.numerics, embedder.numerics],
        "rerank_max_abs_diff_vs_fp32_recipe": float(np.abs(scores - ref_scores).max()),
        "rerank_max_abs_diff_vs_bf16_recipe": float(np.abs(scores - recipe_bf16).max()),
        "bf16_recipe_max_abs_diff_vs_fp32_recipe": float(np.abs(recipe_bf16 - ref_scores).max()),
        "rerank_same_order_as_fp32": bool((np.argsort(-scores) == np.argsort(-ref_scores)).all()),
        "embed_max_abs_diff_vs_fp32_recipe": float(np.abs(vecs - ref_vecs).max()),
        "embed_min_cosine_vs_bf16_recipe": float(cosine.min()),
        "throughput": {"pairs": args.pairs, "batch": args.batch, "ours_pairs_per_s": ours_rate,
                       "recipe_pairs_per_s": recipe_rate, "ratio": round(ours_rate / recipe_rate, 2)},
    }  # fmt: skip


if __name__ == "__main__":
    main()
