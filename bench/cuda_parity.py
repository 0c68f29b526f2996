"""CUDA / bf16 check: the device=auto path picks CUDA + bf16 and still matches the recipes.

Needs a GPU; prints one JSON line. fp32 on CUDA must equal the model-card recipe within
1e-5; bf16 (what `dtype=auto` picks on CUDA) is compared with the fp32 recipe, and its
ranking agreement is reported, since bf16 cannot be 1e-5 exact.
"""

import json
import sys
import tempfile
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
from twostage.retrieval.tiny_models import write_tiny_models


def main() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

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
    cuda_ref = recipe_rerank(ref_model.cuda(), ref_tok, [(query, d) for d in docs], DEFAULT_TASK)
    for dtype in ("auto", "float32"):
        settings = Settings(
            embedder={"model": str(paths.embedder)},
            reranker={"model": str(paths.reranker)},
            cache_dir=tmp / "cache",
            device="auto",
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
    print(json.dumps({**out, **run_info("cuda" if torch.cuda.is_available() else "cpu")}))


if __name__ == "__main__":
    main()
