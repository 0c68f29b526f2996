"""Training data formats, bad lines with file:line, query-level splits and general-domain mixing."""

import json
from functools import partial
from pathlib import Path

import pytest

from twostage.retrieval.core.errors import InputError
from twostage.training.data import Graded, Pair, load_examples, mix_general, split_by_query


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_all_formats_and_bad_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.jsonl",
        [
            {"query": "q1", "positive": "p1"},
            {"query": "q2", "positive": "p2", "negatives": ["n1", "n2"], "instruction": "Find packages"},
            {"query": "q3", "document": "d3", "label": 5},
            {"query": "q4", "document": "d4", "label": 0.25},
            {
                "messages": [{"role": "user", "content": "swift q"}],
                "positive_messages": [[{"role": "user", "content": "swift p"}]],
                "negative_messages": [[{"role": "user", "content": "swift n"}]],
            },
            {
                "system": "s",
                "input": "<Instruct>: inst\n<Query>: rq\n<Document>: rd\nline 2",
                "output": "yes",
            },
            "{broken",
            {"query": "q", "positive": ""},
            {"query": "q", "document": "d", "label": 7},
            {"input": "no tags", "output": "yes"},
            ["not", "an", "object"],
        ],
    )
    report = load_examples(path)
    assert report.examples == [
        Pair("q1", "p1"),
        Pair("q2", "p2", ("n1", "n2"), "Find packages"),
        Graded("q3", "d3", 1.0),
        Graded("q4", "d4", 0.25),
        Pair("swift q", "swift p", ("swift n",)),
        Graded("rq", "rd\nline 2", 1.0, "inst"),
    ]
    bad = [str(b) for b in report.bad]
    assert bad[0].startswith(f"{path}:7: invalid JSON")
    assert bad[1] == f"{path}:8: missing 'positive' (a non-empty string)"
    assert bad[2] == f"{path}:9: 'label' 7 is outside [0, 1] and 1-5"
    assert bad[3].startswith(f"{path}:10: ms-swift reranker 'input' must be")
    assert bad[4] == f"{path}:11: a line must be a JSON object"
    with pytest.raises(InputError, match=":7: invalid JSON"):
        load_examples(path, strict=True)
    with pytest.raises(InputError, match="no usable examples"):
        load_examples(write(tmp_path / "bad.jsonl", ["{x"]))
    with pytest.raises(InputError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")


def test_split_is_by_query_deterministic_and_stable() -> None:
    examples = [Pair(f"q{i % 50}", f"p{i}") for i in range(500)]
    train, dev = split_by_query(examples, 0.2)
    assert {e.query for e in train}.isdisjoint({e.query for e in dev})
    assert 0.1 < len(dev) / len(examples) < 0.3
    assert split_by_query(list(reversed(examples)), 0.2)[1] == list(reversed(dev))
    assert split_by_query(examples, 0.2, seed=1)[1] != dev


def test_general_domain_mixing_ratio() -> None:
    domain = [Pair(f"d{i}", "p") for i in range(70)]
    general = [Pair(f"g{i}", "p") for i in range(1000)]
    mixed = mix_general(domain, general)
    assert sum(e.query.startswith("g") for e in mixed) == 30 and set(domain) <= set(mixed)
    assert mix_general(domain, general, ratio=(1, 1), seed=3) != mix_general(
        domain, general, ratio=(1, 1), seed=4
    )
    assert mix_general(domain, []) == domain


@pytest.mark.parametrize("appends_eos", [True, False], ids=["tokenizer-appends-eos", "eos-by-hand"])
def test_sentence_transformer_view_embeds_like_the_inference_embedder(
    tiny_settings, tiny_models, tmp_path: Path, appends_eos: bool
) -> None:
    """Training sees the same vectors inference computes (prompt, padding, pooling, norm, and the
    final <|endoftext|> whether the tokenizer appends it or `LastTokenEmbedder` does by hand)."""
    import shutil

    import numpy as np

    from twostage.retrieval.models.loading import load_embedder
    from twostage.retrieval.models.tiny import qwen3_tokenizer_json
    from twostage.training.st_model import load_st_embedder

    model_dir = tiny_models.embedder
    if not appends_eos:  # an older Qwen3-Embedding snapshot: the tokenizer appends nothing
        model_dir = tmp_path / "embedder-no-eos"
        shutil.copytree(tiny_models.embedder, model_dir)
        (model_dir / "tokenizer.json").write_bytes(qwen3_tokenizer_json(append_eos=False))
    settings = tiny_settings.model_copy(deep=True)
    settings.embedder.model = str(model_dir)
    inference = load_embedder(settings)
    st = load_st_embedder(model_dir, settings)
    assert st.tokenizer("a")["input_ids"][-1] == 151643
    queries = ["short", "a considerably longer query about Debian packages and chess engines"]
    docs = ["doc one", "document two is longer than the first one by a fair bit", "三"]
    np.testing.assert_allclose(
        st.encode(queries, prompt_name="query", convert_to_numpy=True),
        inference.embed_queries(queries),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        st.encode(docs, convert_to_numpy=True), inference.embed_documents(docs), atol=1e-5
    )


def test_training_refuses_tiny_datasets_before_starting(tmp_path: Path, tiny_models, model_cache) -> None:
    import os
    import subprocess
    import sys

    train = write(tmp_path / "t.jsonl", [{"query": f"q{i}", "positive": f"p{i}"} for i in range(5)])
    env = {**os.environ, "TWOSTAGE_EMBEDDER__MODEL": str(tiny_models.embedder), "TWOSTAGE_CACHE_DIR": str(model_cache),
           "TWOSTAGE_DEVICE": "cpu"}  # fmt: skip
    command = [sys.executable, "-m", "twostage.api.cli", "train", "embedder", "--train", str(train), "--dev", str(train),
               "--out", str(tmp_path / "run"), "--batch-size", "32"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "twostage: error: 5 training pairs is fewer than one batch of 32" in result.stderr
    assert "Traceback" not in result.stderr


def test_beir_folder_with_flat_qrels(tmp_path: Path) -> None:
    from twostage.training.evaluation import load_beir

    write(
        tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}]
    )
    write(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q9", "text": "unjudged"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    data = load_beir(tmp_path)
    assert (
        data.queries == {"q1": "first"} and data.qrels == {"q1": {"d2": 1}} and data.corpus["d1"] == "T\none"
    )
    with pytest.raises(InputError, match=r"neither qrels\.tsv"):
        load_beir(tmp_path / "missing")


def test_a_pairs_instruction_reaches_mining_training_and_evaluation_as_serving_uses_it(
    tiny_settings, tiny_models, minilm_settings
) -> None:
    import numpy as np

    from twostage.retrieval.models.loading import load_embedder
    from twostage.retrieval.models.source import resolve_model
    from twostage.training.data import Pair
    from twostage.training.embedder_training import training_datasets
    from twostage.training.evaluation import from_pairs, recall_runs
    from twostage.training.mining import MiningSettings, _mine_group, mine
    from twostage.training.st_model import load_st_embedder, prompt_for, query_prompt

    serving = load_embedder(tiny_settings)
    st = load_st_embedder(tiny_models.embedder, tiny_settings)
    task = "Given a Debian package synopsis, retrieve its description"
    pairs = [
        Pair("chess engine", "a program that plays chess", instruction=task),
        Pair("text editor", "edit files in a terminal"),
        Pair("cd ripper", "rip audio CDs to files", instruction=task),
    ]
    # training: one dataset per instruction, each anchor prompt the one serving uses
    datasets, prompts = training_datasets(pairs, partial(prompt_for, st))
    assert sorted(len(d) for d in datasets.values()) == [1, 2]
    assert sorted(p["anchor"] for p in prompts.values()) == sorted(
        [query_prompt(task), query_prompt(tiny_settings.embedder.instruction)]
    )
    for name, dataset in datasets.items():
        row = dataset[0]
        pair = next(p for p in pairs if p.query == row["anchor"])
        np.testing.assert_allclose(
            st.encode([row["anchor"]], prompt=prompts[name]["anchor"]),
            serving.embed_queries([row["anchor"]], pair.instruction),
            atol=1e-5,
        )
    # evaluation: each query embedded with its own instruction, exactly as /v1/search embeds it
    data = from_pairs(pairs)
    runs = recall_runs(data, serving, ["dense"], top_k=3, instruction=None)
    for qid, pair in zip(data.queries, pairs, strict=True):
        positive = next(d for d, text in data.corpus.items() if text == pair.positive)
        expected = (
            serving.embed_queries([pair.query], pair.instruction)[0]
            @ serving.embed_documents([pair.positive])[0]
        )
        assert runs["dense"][qid][positive] == pytest.approx(float(expected), abs=1e-5)
    # mining: pairs with an instruction are mined with its prompt
    corpus = [f"package number {i} does something else" for i in range(30)]
    settings = MiningSettings(num_negatives=2, range_min=0, range_max=10, relative_margin=None)  # type: ignore[arg-type]
    with_task = [p for p in pairs if p.instruction]
    mined = {p.query: p.negatives for p in mine(pairs, corpus, st, settings)}
    full = list(dict.fromkeys([*corpus, *(p.positive for p in pairs)]))
    direct = _mine_group(with_task, full, st, settings, query_prompt(task), None, "", None)
    assert len(direct) == 2 and all(p.instruction == task for p in direct)
    assert {p.query: p.negatives for p in direct} == {
        q: mined[q] for q in (p.query for p in with_task) if q in mined
    }
    # a model that is not instruction-aware (MiniLM) keeps its own query prompt, as serving ignores it
    minilm = load_st_embedder(resolve_model("pypi:all-MiniLM-L6-v2", cache_dir=minilm_settings.cache_dir).path,
                              minilm_settings)  # fmt: skip
    assert prompt_for(minilm, task) == prompt_for(minilm, None)
