"""One contract for every `Embedder` and every `Reranker`, as the stores share one (`test_store_contract`).

Embedders: Qwen3 last-token (tiny Qwen3), sentence-transformers (all-MiniLM-L6-v2), remote (a
second twostage serving the tiny pair over HTTP). Rerankers: Qwen3 yes/no (tiny Qwen3), a MiniLM
cross-encoder, remote (Jina/vLLM protocol, the same server). Each property holds for all six;
what a family does beyond it (exact Qwen3 parity, remote faults) has its own tests.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import Served

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.fingerprint import PROBES, Fingerprint
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.prompts import DEFAULT_TASK
from twostage.retrieval.models.remote_embedder import RemoteEmbedder
from twostage.retrieval.models.remote_reranker import RemoteReranker
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.models.settings import EmbedderSettings, RerankerSettings

NUMERIC_PATHS = {"float32", "bfloat16", "float16", "int8-dynamic", "int8-fused", "remote"}
TEXTS = [
    "apt installs packages and their dependencies",
    "a chess engine with a graphical board",
    "数据 ünïcödé 12345 <tag> & ☃",
    "network scanner",
]
QUERY = "which program plays chess"


EMBEDDERS = ["last-token", "sentence-transformers", "remote"]
RERANKERS = ["yes-no", "cross-encoder", "remote"]


@pytest.fixture(scope="module")
def embedders(
    tiny_settings: Settings, minilm_embedder: Embedder, model_server: Served
) -> dict[str, Callable[[], Embedder]]:
    remote = EmbedderSettings(model="tiny-embedder", backend="remote", remote={"url": model_server.url})
    return {
        "last-token": lambda: load_embedder(tiny_settings),
        "sentence-transformers": lambda: minilm_embedder,
        "remote": lambda: RemoteEmbedder(remote),
    }


@pytest.fixture(scope="module")
def rerankers(
    tiny_settings: Settings, model_cache: Path, cross_encoder_dir: Path, model_server: Served
) -> dict[str, Callable[[], Reranker]]:
    cross_encoder = Settings(reranker={"model": str(cross_encoder_dir)}, cache_dir=model_cache, device="cpu")
    remote = RerankerSettings(model="tiny-reranker", backend="remote", remote={"url": model_server.url})
    return {
        "yes-no": lambda: load_reranker(tiny_settings),
        "cross-encoder": lambda: load_reranker(cross_encoder),
        "remote": lambda: RemoteReranker(remote),
    }


@pytest.mark.parametrize("kind", EMBEDDERS)
def test_embedder_contract(kind: str, embedders: dict[str, Callable[[], Embedder]]) -> None:
    """Identity; float32 unit vectors of `dim` in input order, the same alone or batched and on
    every call; unnormalised vectors on request; an instruction of None is the default task; token
    counts; the fingerprint (where there is one) is of these vectors; a non-list is refused."""
    embedder = embedders[kind]()
    assert isinstance(embedder, Embedder)
    assert embedder.model_id and embedder.pooling and embedder.max_length > 0 and embedder.dim >= 8
    assert embedder.numerics in NUMERIC_PATHS
    for vectors in (embedder.embed_documents(TEXTS), embedder.embed_queries(TEXTS)):
        assert vectors.shape == (len(TEXTS), embedder.dim) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    documents = embedder.embed_documents(TEXTS)
    alone = np.stack([embedder.embed_documents([t])[0] for t in reversed(TEXTS)])
    np.testing.assert_allclose(alone[::-1], documents, atol=1e-4)  # order kept, batching changes nothing
    np.testing.assert_array_equal(embedder.embed_documents(TEXTS), documents)  # deterministic
    raw = embedder.embed_documents(TEXTS, normalize=False)
    assert raw.shape == documents.shape and np.all(np.isfinite(raw))
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), documents, atol=1e-4)
    np.testing.assert_allclose(embedder.embed_queries([QUERY]), embedder.embed_queries([QUERY], DEFAULT_TASK))
    lengths = embedder.document_lengths(TEXTS)
    assert len(lengths) == len(TEXTS) and all(n > 0 for n in lengths)
    assert embedder.document_lengths([TEXTS[0] * 3])[0] > lengths[0]
    fingerprint = embedder.fingerprint
    assert fingerprint is None or fingerprint.matches(Fingerprint.of(embedder.embed_documents(list(PROBES))))
    with pytest.raises(InputError):
        embedder.embed_documents("not a list")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", RERANKERS)
def test_reranker_contract(kind: str, rerankers: dict[str, Callable[[], Reranker]]) -> None:
    """Identity; one finite score per document in input order (probabilities in [0, 1]), the same
    in any order, alone or batched with other requests; `rerank` sorts them (ties in input order)
    and cuts at top_n; input lengths grow with the document; an empty query is refused."""
    reranker = rerankers[kind]()
    assert isinstance(reranker, Reranker)
    assert reranker.family in {"yes-no", "cross-encoder"} and reranker.max_length > 0
    assert reranker.model_id and reranker.numerics in NUMERIC_PATHS
    scores = reranker.score(QUERY, TEXTS)
    assert len(scores) == len(TEXTS) and all(np.isfinite(scores))
    if reranker.probabilities:
        assert all(0.0 <= s <= 1.0 for s in scores)
    np.testing.assert_allclose(reranker.score(QUERY, TEXTS[::-1])[::-1], scores, atol=1e-5)
    many = reranker.score_many([(QUERY, TEXTS, None), ("a text editor", TEXTS[:2], DEFAULT_TASK)])
    np.testing.assert_allclose(many[0], scores, atol=1e-5)
    np.testing.assert_allclose(many[1], reranker.score("a text editor", TEXTS[:2], DEFAULT_TASK), atol=1e-5)
    np.testing.assert_allclose(reranker.score(QUERY, TEXTS, DEFAULT_TASK), scores, atol=1e-5)
    ranked = reranker.rerank(QUERY, [*TEXTS, TEXTS[0]], top_n=3)
    assert len(ranked) == 3 and [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    everything = reranker.rerank(QUERY, [*TEXTS, TEXTS[0]])
    assert sorted(r.index for r in everything) == list(range(len(TEXTS) + 1))
    position = {r.index: k for k, r in enumerate(everything)}
    by_index = {r.index: r.score for r in everything}
    if by_index[0] == by_index[len(TEXTS)]:  # a document given twice: equal scores keep input order
        assert position[0] < position[len(TEXTS)]
    lengths = reranker.input_lengths(QUERY, TEXTS)
    assert len(lengths) == len(TEXTS) and all(n > 0 for n in lengths)
    assert reranker.input_lengths(QUERY, [TEXTS[0] * 3])[0] > lengths[0]
    with pytest.raises(InputError):
        reranker.score("", TEXTS)
