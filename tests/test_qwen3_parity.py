"""Golden parity with the official Qwen3 model-card recipes on the tiny models.

Token ids are pinned (the tokenizer.json is Qwen3's own, so these are the ids the real
models see); scores and vectors must equal the recipes within 1e-5 for 1, 3 and 17
inputs of mixed lengths, whether everything fits one forward pass or each input gets its own.
"""

import random

import numpy as np
import pytest
import torch
from oracles.reference import recipe_embed, recipe_rerank
from sentence_transformers import CrossEncoder
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from twostage.api.settings import Settings
from twostage.retrieval.models.last_token_embedder import LastTokenEmbedder
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.prompts import (
    DEFAULT_TASK,
    RERANKER_PREFIX,
    RERANKER_SUFFIX,
    embedding_query,
    reranker_body,
)
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.yes_no_reranker import YesNoReranker

QUERY = "What is the capital of China?"
DOC = "The capital of China is Beijing."

GOLDEN_RERANKER_PROMPT = [
    151644, 8948, 198, 60256, 3425, 279, 11789, 20027, 279, 8502, 3118, 389, 279, 11361, 323, 279, 758, 1235,
    3897, 13, 7036, 429, 279, 4226, 646, 1172, 387, 330, 9693, 1, 476, 330, 2152, 3263, 151645, 198, 151644,
    872, 198, 27, 641, 1235, 26818, 16246, 264, 3482, 2711, 3239, 11, 17179, 9760, 46769, 429, 4226, 279, 3239,
    198, 27, 2859, 26818, 3555, 374, 279, 6722, 315, 5616, 5267, 75692, 26818, 576, 6722, 315, 5616, 374,
    26549, 13, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271,
]  # fmt: skip
GOLDEN_EMBEDDING_QUERY = [
    641, 1235, 25, 16246, 264, 3482, 2711, 3239, 11, 17179, 9760, 46769, 429, 4226, 279, 3239, 198, 2859, 25,
    3838, 374, 279, 6722, 315, 5616, 30, 151643,
]  # fmt: skip


def mixed_texts(n: int, seed: int) -> list[str]:
    """`n` texts from 1 to ~600 tokens, English, Chinese and code mixed."""
    rng = random.Random(seed)
    pieces = [
        "apt-get install qdrant",
        "向量数据库",
        "def f(x):\n    return x",
        "Debian package",
        "é ü ß",
        "?!",
    ]
    return [" ".join(rng.choice(pieces) for _ in range(rng.choice([1, 2, 5, 20, 60, 150]))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference_reranker(tiny_models: TinyModelPaths) -> tuple[AutoModelForCausalLM, AutoTokenizer]:
    return AutoModelForCausalLM.from_pretrained(tiny_models.reranker).eval(), AutoTokenizer.from_pretrained(
        tiny_models.reranker
    )


@pytest.fixture(scope="module")
def reference_embedder(tiny_models: TinyModelPaths) -> tuple[AutoModel, AutoTokenizer]:
    return AutoModel.from_pretrained(tiny_models.embedder).eval(), AutoTokenizer.from_pretrained(
        tiny_models.embedder
    )


@pytest.fixture(scope="module")
def reranker(tiny_settings: Settings) -> YesNoReranker:
    loaded = load_reranker(tiny_settings)
    assert isinstance(loaded, YesNoReranker)
    return loaded


@pytest.fixture(scope="module")
def embedder(tiny_settings: Settings) -> LastTokenEmbedder:
    loaded = load_embedder(tiny_settings)
    assert isinstance(loaded, LastTokenEmbedder)
    return loaded


def test_golden_reranker_prompt_ids(reranker: YesNoReranker, reference_reranker: tuple) -> None:
    _, tok = reference_reranker
    whole = tok.encode(RERANKER_PREFIX + reranker_body(DEFAULT_TASK, QUERY, DOC) + RERANKER_SUFFIX)
    assert whole == GOLDEN_RERANKER_PROMPT
    assert reranker.prompt_tokens(QUERY, [DOC]).full(0) == GOLDEN_RERANKER_PROMPT
    assert (reranker.yes_id, reranker.no_id) == (9693, 2152)


def test_golden_embedding_query_ids(embedder: LastTokenEmbedder) -> None:
    assert embedding_query(DEFAULT_TASK, QUERY) == f"Instruct: {DEFAULT_TASK}\nQuery:{QUERY}"
    assert embedder.tokenize([embedding_query(DEFAULT_TASK, QUERY)]) == [GOLDEN_EMBEDDING_QUERY]


def test_split_prompt_tokenizes_like_the_whole_prompt(
    reranker: YesNoReranker, reference_reranker: tuple
) -> None:
    """The shared-prefix split must never change a token at the query/document boundary."""
    _, tok = reference_reranker
    queries = [
        "plain query",
        "ends with a question?",
        "ends with newline\n",
        "中文查询",
        "trailing space ",
        "x:",
    ]
    docs = ["doc", " leading space", "\nleading newline", "中文文档", "<tag> html", "", "?!"]
    for q in queries:
        prompt = reranker.prompt_tokens(q, docs, instruction="Find: it")
        for i, d in enumerate(docs):
            whole = tok.encode(RERANKER_PREFIX + reranker_body("Find: it", q, d) + RERANKER_SUFFIX)
            assert prompt.full(i) == whole, (q, d)


@pytest.mark.parametrize("packed", [True, False])  # CPU: packed rows; CUDA: padded batches
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("batch_tokens", [64, 1 << 20])
def test_reranker_scores_equal_recipe(
    reranker: YesNoReranker, reference_reranker: tuple, n: int, batch_tokens: int, packed: bool
) -> None:
    model, tok = reference_reranker
    docs = mixed_texts(n, seed=n)
    assert reranker.packed  # loaded on a CPU
    reranker.batch_tokens = batch_tokens  # 64: one document per forward pass; 1<<20: all in one (or in packs)
    reranker.packed = packed
    try:
        ours = reranker.score(QUERY, docs, instruction="Given a package synopsis, find its description")
    finally:
        reranker.batch_tokens, reranker.packed = 16384, True
    ref = recipe_rerank(
        model, tok, [(QUERY, d) for d in docs], "Given a package synopsis, find its description"
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch_tokens", [64, 1 << 20])
def test_score_many_across_queries_equals_recipe(
    reranker: YesNoReranker, reference_reranker: tuple, batch_tokens: int, packed: bool
) -> None:
    """Requests with different queries, instructions and prefix lengths batched together."""
    model, tok = reference_reranker
    requests = [
        (QUERY, mixed_texts(5, seed=1), None),
        ("a much longer query about viewing and editing photographs on the desktop", mixed_texts(9, seed=2),
         "Given a package synopsis, find its description"),
        ("empty", [], None),
        ("q", mixed_texts(1, seed=3), "短い指示"),
    ]  # fmt: skip
    reranker.batch_tokens, reranker.packed = batch_tokens, packed  # packed: rows mix queries' documents
    try:
        many = reranker.score_many(requests)
    finally:
        reranker.batch_tokens, reranker.packed = 16384, True
    assert [len(m) for m in many] == [5, 9, 0, 1]
    for (query, docs, instruction), scores in zip(requests, many, strict=True):
        if docs:
            task = instruction or reranker.instruction
            ref = recipe_rerank(model, tok, [(query, d) for d in docs], task)
            np.testing.assert_allclose(scores, ref, atol=1e-5, rtol=0)


def test_reranker_truncates_only_the_document(reference_reranker: tuple, tiny_models: TinyModelPaths) -> None:
    model, tok = reference_reranker
    short = YesNoReranker(model, tok, model_id="tiny", max_length=128, instruction=DEFAULT_TASK)
    docs = ["word " * 5000, "short doc", "中文" * 3000]
    prompt = short.prompt_tokens(QUERY, docs)
    for i in range(len(docs)):
        full = prompt.full(i)
        assert len(full) <= 128
        assert full[: len(prompt.shared)] == prompt.shared
        assert full[-len(prompt.suffix) :] == tok.encode(RERANKER_SUFFIX)
    np.testing.assert_allclose(
        short.score(QUERY, docs),
        recipe_rerank(model, tok, [(QUERY, d) for d in docs], DEFAULT_TASK, 128),
        atol=1e-5,
    )


def test_reranker_instruction_changes_scores(reranker: YesNoReranker) -> None:
    a = reranker.score(QUERY, [DOC, "Paris is in France."])
    b = reranker.score(QUERY, [DOC, "Paris is in France."], instruction="Judge the grammar only")
    assert not np.allclose(a, b)


def test_rerank_sorts_and_cuts(reranker: YesNoReranker) -> None:
    docs = mixed_texts(9, seed=3)
    scores = reranker.score(QUERY, docs)
    ranked = reranker.rerank(QUERY, docs, top_n=4)
    assert [r.index for r in ranked] == sorted(range(9), key=lambda i: -scores[i])[:4]
    assert [r.score for r in ranked] == sorted(scores, reverse=True)[:4]


@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("batch_tokens", [64, 1 << 20])
def test_embeddings_equal_recipe(
    embedder: LastTokenEmbedder, reference_embedder: tuple, n: int, batch_tokens: int
) -> None:
    model, tok = reference_embedder
    texts = mixed_texts(n, seed=100 + n)
    embedder.batch_tokens = batch_tokens
    try:
        queries = embedder.embed_queries(texts, instruction="Find the package")
        documents = embedder.embed_documents(texts)
    finally:
        embedder.batch_tokens = 16384
    ref_q = recipe_embed(model, tok, [embedding_query("Find the package", t) for t in texts]).numpy()
    ref_d = recipe_embed(model, tok, texts).numpy()
    assert queries.dtype == np.float32 and queries.shape == (n, 64)
    np.testing.assert_allclose(queries, ref_q, atol=1e-5)
    np.testing.assert_allclose(documents, ref_d, atol=1e-5)


def test_embedding_truncates_at_max_length_keeping_endoftext(reference_embedder: tuple) -> None:
    model, tok = reference_embedder
    short = LastTokenEmbedder(model, tok, model_id="tiny", max_length=32, instruction=DEFAULT_TASK)
    long_text = "Debian packages " * 2000
    assert short.tokenize([long_text])[0][-1] == 151643 and len(short.tokenize([long_text])[0]) == 32
    np.testing.assert_allclose(
        short.embed_documents([long_text]),
        recipe_embed(model, tok, [long_text], max_length=32).numpy(),
        atol=1e-5,
    )


def test_embedder_appends_endoftext_when_tokenizer_does_not(reference_embedder: tuple, tiny_models) -> None:
    """Older Qwen3-Embedding tokenizers did not append <|endoftext|>; the card appended it by hand."""
    model, _ = reference_embedder
    plain_tok = AutoTokenizer.from_pretrained(
        tiny_models.reranker
    )  # ByteLevel post-processor: appends nothing
    appending_tok = AutoTokenizer.from_pretrained(tiny_models.embedder)
    a = LastTokenEmbedder(model, plain_tok, model_id="a", instruction=DEFAULT_TASK)
    b = LastTokenEmbedder(model, appending_tok, model_id="b", instruction=DEFAULT_TASK)
    assert a.tokenize(["hello world"]) == b.tokenize(["hello world"]) == [[14990, 1879, 151643]]
    np.testing.assert_allclose(
        a.embed_documents(["hello world"]), b.embed_documents(["hello world"]), atol=1e-6
    )


def test_matryoshka_truncates_then_normalises(reference_embedder: tuple) -> None:
    model, tok = reference_embedder
    full = LastTokenEmbedder(model, tok, model_id="t", instruction=DEFAULT_TASK)
    small = LastTokenEmbedder(model, tok, model_id="t", dim=32, instruction=DEFAULT_TASK)
    texts = ["alpha beta", "gamma"]
    v_full, v_small = full.embed_documents(texts), small.embed_documents(texts)
    expected = v_full[:, :32] / np.linalg.norm(v_full[:, :32], axis=1, keepdims=True)
    assert v_small.shape == (2, 32)
    np.testing.assert_allclose(v_small, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v_small, axis=1), 1.0, atol=1e-6)


def test_crossencoder_path_equals_recipe_only_with_the_template(
    tiny_models: TinyModelPaths, reference_reranker: tuple, tmp_path
) -> None:
    """sentence-transformers loads the reranker as Transformer + LogitScore; it must render our template."""
    model, tok = reference_reranker
    docs = mixed_texts(5, seed=7)
    pairs = [(QUERY, d) for d in docs]
    ce = CrossEncoder(str(tiny_models.reranker), local_files_only=True, device="cpu")
    for instruction in (DEFAULT_TASK, "Find code that does this"):
        np.testing.assert_allclose(
            ce.predict(pairs, prompt=instruction), recipe_rerank(model, tok, pairs, instruction), atol=1e-5
        )
    # Without the template sentence-transformers still returns scores, just wrong ones: the silent
    # failure this test guards against.
    bare = tmp_path / "no-template"
    bare.mkdir()
    for f in tiny_models.reranker.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).symlink_to(f)
    untemplated = CrossEncoder(str(bare), local_files_only=True, device="cpu").predict(
        pairs, prompt=DEFAULT_TASK
    )
    assert np.abs(np.asarray(untemplated) - recipe_rerank(model, tok, pairs, DEFAULT_TASK)).max() > 1e-3


def test_scores_are_deterministic_and_in_unit_interval(reranker: YesNoReranker) -> None:
    docs = mixed_texts(6, seed=11)
    a, b = reranker.score(QUERY, docs), reranker.score(QUERY, docs)
    assert a == b
    assert all(0.0 < s < 1.0 for s in a)
    torch.testing.assert_close(
        torch.tensor(reranker.score(QUERY, docs[::-1])), torch.tensor(a[::-1]), atol=1e-6, rtol=0
    )
