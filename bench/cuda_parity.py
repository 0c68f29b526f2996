"""CUDA / bf16 check: the device=auto path picks CUDA + bf16 and still matches the recipes.

Meant for a GPU (`python bench/cuda_parity.py`, one JSON line); without one it runs the same
checks on the CPU (bf16 there where the CPU has it natively). fp32 must equal the model-card
recipe within 1e-5; bf16 (what `dtype=auto` picks on CUDA) is compared with the fp32 recipe
and with the recipe itself run in bf16, and its ranking agreement is reported, since bf16
cannot be 1e-5 exact. `bf16_throughput`: pairs/s of our bf16 reranker and of the recipe in
bf16 on the same pairs at equal batch (`--batch` pairs per forward pass for both).

`--full-size` adds `qwen3_0.6b_shape`: random models with Qwen3-Reranker-0.6B's and
Qwen3-Embedding-0.6B's shape (28 layers, width 1024) and the real tokenizer, since the real
weights cannot be downloaded where this runs. Their scores mean nothing, but their speed is
the real models' speed, and their parity shows the error of 28 bf16 layers: fp32 and bf16,
ours against the recipe on the same device, and pairs/s and texts/s at each `--batches` size.
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_info
from tests.oracles.reference import recipe_embed, recipe_rerank
from twostage.api.settings import Settings
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.prompts import DEFAULT_TASK, embedding_query
from twostage.retrieval.models.qwen_vocab import VOCAB_SIZE
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.models.tiny import TinyModelPaths, write_tiny_models


def main() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="pairs per forward pass, ours and the recipe's")
    parser.add_argument("--pairs", type=int, default=256, help="pairs timed for bf16_throughput")
    parser.add_argument("--full-size", action="store_true", help="also time Qwen3-0.6B-shaped models")
    parser.add_argument("--batches", default="16,64", help="--full-size batch sizes, comma-separated")
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
    if args.full_size:
        out["qwen3_0.6b_shape"] = full_size(tmp, device, [int(b) for b in args.batches.split(",")])
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

    ours_rate = rate(lambda: reranker.score(query, timed), len(timed), device)
    recipe_rate = rate(
        lambda: recipe_batches(recipe_model, tokenizer, query, timed, args.batch), len(timed), device
    )
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


def rate(fn: Callable[[], object], items: int, device: str) -> float:
    """Items per second of `fn`'s second call (the first warms kernels and caches up)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return round(items / (time.perf_counter() - started), 1)


def recipe_batches(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, query: str, docs: list[str], batch: int
) -> list[float]:
    """The reranker recipe over `docs`, `batch` pairs per forward pass, in the order given."""
    scores: list[float] = []
    for i in range(0, len(docs), batch):
        scores += recipe_rerank(model, tokenizer, [(query, d) for d in docs[i : i + batch]], DEFAULT_TASK)
    return scores


def qwen3_0_6b_config() -> Qwen3Config:
    """Qwen3-0.6B's shape, as Qwen3-Reranker-0.6B's and Qwen3-Embedding-0.6B's config.json give it."""
    return Qwen3Config(  # type: ignore[call-arg]
        vocab_size=VOCAB_SIZE, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=True,
        pad_token_id=151643, eos_token_id=151645, bos_token_id=None,
    )  # fmt: skip


def full_size(tmp: Path, device: str, batches: list[int]) -> dict[str, object]:
    """Random Qwen3-0.6B-shaped models: fp32 and bf16 parity with the recipes, then speed.

    Documents run from 20 to about 400 words, in a fixed order, so both sides pad alike.
    Ours is timed as served (its token budget set to `batch` of the longest prompts, sorted
    by length); the recipe takes `batch` pairs at a time in the order given.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    paths = write_tiny_models(tmp / "models-0.6b", config=qwen3_0_6b_config())
    words = ("the", "package", "ships", "a", "library", "for",
             "vector", "search", "with", "tools", "and", "docs")  # fmt: skip
    docs = [" ".join(words[(i + j) % len(words)] for j in range(20 + (i * 53) % 380)) for i in range(256)]
    tokenizer = AutoTokenizer.from_pretrained(paths.reranker)
    emb_tok = AutoTokenizer.from_pretrained(paths.embedder)
    longest = max(len(tokenizer.encode(d)) for d in docs) + 64
    result: dict[str, object] = {}
    recipe_scores: dict[str, np.ndarray] = {}
    recipe_vecs: dict[str, np.ndarray] = {}
    ours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for dtype in ("float32", "bfloat16"):
        kind = getattr(torch, dtype)
        recipe = Recipe(
            AutoModelForCausalLM.from_pretrained(paths.reranker, dtype=kind).to(device).eval(), tokenizer,
            AutoModel.from_pretrained(paths.embedder, dtype=kind).to(device).eval(), emb_tok,
        )  # fmt: skip
        recipe_scores[dtype], recipe_vecs[dtype] = recipe.rerank(docs[:32], 16), recipe.embed(docs[:32], 16)
        row: dict[str, object] = {}
        for batch in batches:
            settings = Settings(
                embedder={"model": str(paths.embedder), "batch_tokens": batch * longest},
                reranker={"model": str(paths.reranker), "batch_tokens": batch * longest},
                cache_dir=tmp / "cache", device=device, dtype=dtype,
            )  # fmt: skip
            reranker, embedder = load_reranker(settings), load_embedder(settings)
            if batch == batches[0]:
                row["numerics"] = [reranker.numerics, embedder.numerics]
                ours[dtype] = (np.array(reranker.score(QUERY, docs[:32])), embedder.embed_queries(docs[:32]))
            row[f"batch_{batch}"] = speeds(reranker, embedder, recipe, docs, batch, device)
        result[dtype] = row
        del recipe
        if device == "cuda":
            torch.cuda.empty_cache()
    for dtype, (scores, vecs) in ours.items():
        result[dtype] |= {  # type: ignore[operator]
            "rerank_max_abs_diff_vs_recipe_same_dtype": float(np.abs(scores - recipe_scores[dtype]).max()),
            "rerank_max_abs_diff_vs_fp32_recipe": float(np.abs(scores - recipe_scores["float32"]).max()),
            "rerank_spearman_vs_fp32_recipe": spearman(scores, recipe_scores["float32"]),
            "embed_min_cosine_vs_recipe_same_dtype": float((vecs * recipe_vecs[dtype]).sum(1).min()),
            "embed_min_cosine_vs_fp32_recipe": float((vecs * recipe_vecs["float32"]).sum(1).min()),
        }
    fp32, bf16_vecs = recipe_scores["float32"], recipe_vecs["bfloat16"]
    result["bf16_recipe"] = {
        "rerank_max_abs_diff_vs_fp32_recipe": float(np.abs(recipe_scores["bfloat16"] - fp32).max()),
        "rerank_spearman_vs_fp32_recipe": spearman(recipe_scores["bfloat16"], fp32),
        "embed_min_cosine_vs_fp32_recipe": float((bf16_vecs * recipe_vecs["float32"]).sum(1).min()),
        "fp32_recipe_score_range": [float(fp32.min()), float(fp32.max())],
    }
    return result


QUERY = "fast vector search library"


@dataclass
class Recipe:
    """The model cards' code on one pair of loaded models, `batch` texts per forward pass."""

    reranker: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    embedder: PreTrainedModel
    embed_tokenizer: PreTrainedTokenizerBase

    def rerank(self, docs: list[str], batch: int) -> np.ndarray:
        return np.array(recipe_batches(self.reranker, self.tokenizer, QUERY, docs, batch))

    def embed(self, docs: list[str], batch: int) -> np.ndarray:
        texts = [embedding_query(DEFAULT_TASK, d) for d in docs]
        return np.concatenate([
            recipe_embed(self.embedder, self.embed_tokenizer, texts[i : i + batch]).float().cpu().numpy()
            for i in range(0, len(texts), batch)
        ])  # fmt: skip


def speeds(
    reranker: Reranker, embedder: Embedder, recipe: Recipe, docs: list[str], batch: int, device: str
) -> dict[str, float]:
    """Pairs/s and texts/s, ours and the recipe's, on the same documents."""
    return {
        "rerank_pairs_per_s": rate(lambda: reranker.score(QUERY, docs), len(docs), device),
        "recipe_rerank_pairs_per_s": rate(lambda: recipe.rerank(docs, batch), len(docs), device),
        "embed_texts_per_s": rate(lambda: embedder.embed_queries(docs), len(docs), device),
        "recipe_embed_texts_per_s": rate(lambda: recipe.embed(docs, batch), len(docs), device),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation: whether two score lists order the documents alike."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


if __name__ == "__main__":
    main()
