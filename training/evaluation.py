"""Retrieval evaluation: dense-only and two-stage, for any number of model pairs.

Metrics come from `ir_measures` (pytrec_eval underneath): nDCG@10, RR@10 (MRR@10),
R@10, R@100 and AP over the top-K. Dense retrieval is exact cosine search over the whole
evaluation corpus (so the numbers measure the models, not an index); two-stage reranks
the dense top-K with the reranker, the way `/v1/search` does. The report is JSON, a PNG
bar chart and a printed table.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twostage.retrieval.embedder import Embedder
from twostage.retrieval.errors import InputError
from twostage.retrieval.progress import progress
from twostage.retrieval.reranker import Reranker
from twostage.retrieval.search import Deployment, two_stage_search
from twostage.retrieval.store import VectorStore
from twostage.training.data import Pair

METRICS = ("nDCG@10", "RR@10", "R@10", "R@100", "AP")
EMBED_BLOCK = 512  # documents per progress step


@dataclass
class EvalSet:
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]


def from_pairs(dev: Sequence[Pair], distractors: Sequence[str] = ()) -> EvalSet:
    """Dev queries against their positives (and negatives) plus distractor documents."""
    corpus: dict[str, str] = {}
    ids: dict[str, str] = {}
    for text in [*(t for p in dev for t in (p.positive, *p.negatives)), *distractors]:
        if text not in ids:
            ids[text] = f"d{len(ids)}"
            corpus[ids[text]] = text
    queries = {f"q{i}": p.query for i, p in enumerate(dev)}
    qrels = {f"q{i}": {ids[p.positive]: 1} for i, p in enumerate(dev)}
    return EvalSet(queries, corpus, qrels)


def load_beir(folder: Path, split: str = "test") -> EvalSet:
    """A BEIR-style folder: corpus.jsonl, queries.jsonl, and qrels.tsv or qrels/{split}.tsv."""

    def rows(name: str) -> list[dict[str, Any]]:
        with (folder / name).open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    qrels: dict[str, dict[str, int]] = {}
    qrels_file = (
        folder / "qrels.tsv" if (folder / "qrels.tsv").exists() else folder / "qrels" / f"{split}.tsv"
    )
    if not qrels_file.exists():
        raise InputError(f"{folder} has neither qrels.tsv nor qrels/{split}.tsv")
    with qrels_file.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if line_no == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[-1])
    corpus = {str(r["_id"]): (r.get("title", "") + "\n" + r["text"]).strip() for r in rows("corpus.jsonl")}
    queries = {str(r["_id"]): r["text"] for r in rows("queries.jsonl") if str(r["_id"]) in qrels}
    return EvalSet(queries, corpus, qrels)


def evaluate(
    data: EvalSet,
    embedder: Embedder,
    reranker: Reranker | None,
    *,
    top_k: int = 100,
    instruction: str | None = None,
) -> dict[str, dict[str, float]]:
    """{"dense": metrics, "two-stage": metrics} for one (embedder, reranker) pair."""
    if not data.queries:
        raise InputError("the evaluation set has no queries")
    doc_ids = list(data.corpus)
    blocks = range(0, len(doc_ids), EMBED_BLOCK)
    doc_vectors = np.concatenate(
        [
            embedder.embed_documents([data.corpus[d] for d in doc_ids[start : start + EMBED_BLOCK]])
            for start in progress(blocks, desc=f"embed {len(doc_ids)} documents", unit="block")
        ]
    )
    query_ids = list(data.queries)
    query_vectors = embedder.embed_queries([data.queries[q] for q in query_ids], instruction)
    dense: dict[str, dict[str, float]] = {}
    tops: dict[str, np.ndarray] = {}
    for start in range(0, len(query_ids), 256):
        scores = query_vectors[start : start + 256] @ doc_vectors.T
        for row, qid in zip(scores, query_ids[start : start + 256], strict=True):
            tops[qid] = top = np.argsort(-row)[:top_k]
            dense[qid] = {doc_ids[i]: float(row[i]) for i in top}
    reranked: dict[str, dict[str, float]] = {}
    if reranker is not None:
        for qid in progress(query_ids, desc=f"rerank top {top_k}", unit="query"):
            texts = [data.corpus[doc_ids[i]] for i in tops[qid]]
            rerank_scores = reranker.score(data.queries[qid], texts, instruction)
            reranked[qid] = {doc_ids[i]: float(s) for i, s in zip(tops[qid], rerank_scores, strict=True)}
    out = {"dense": score_run(data.qrels, dense)}
    if reranker is not None:
        out["two-stage"] = score_run(data.qrels, reranked)
    return out


def evaluate_index(
    dev: Sequence[Pair], deployment: Deployment, store: VectorStore, *, top_k: int, instruction: str | None
) -> dict[str, dict[str, float]]:
    """The same metrics end to end through the index: `two_stage_search` as `/v1/search` runs it,
    one hit per document (`group_by_doc`). A hit is relevant when its chunk is part of the
    query's positive passage, so documents split into several chunks are judged right too.
    """
    if not dev:
        raise InputError("no dev pairs to evaluate with")
    qrels = {f"q{i}": {"positive": 1} for i in range(len(dev))}
    runs: dict[str, dict[str, dict[str, float]]] = {"dense": {}, "two-stage": {}}
    for i, pair in enumerate(dev):
        result = two_stage_search(
            deployment,
            store,
            pair.query,
            instruction=instruction,
            top_k=top_k,
            top_n=top_k,
            group_by_doc=True,
        )
        keys = [
            "positive" if h.text.strip()[:200] in pair.positive else f"doc:{h.doc_id}" for h in result.hits
        ]
        runs["dense"][f"q{i}"] = {k: h.recall_score for k, h in zip(keys, result.hits, strict=True)}
        runs["two-stage"][f"q{i}"] = {
            k: float(h.rerank_score or 0.0) for k, h in zip(keys, result.hits, strict=True)
        }
    return {mode: score_run(qrels, run) for mode, run in runs.items()}


def score_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """METRICS of a run (query -> {doc: score}) against qrels, via ir_measures."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in METRICS]
    values = ir_measures.calc_aggregate(measures, qrels, run)
    return {str(k): float(v) for k, v in sorted(values.items(), key=lambda kv: METRICS.index(str(kv[0])))}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (system, mode)."""
    lines = [f"{'system':<28}{'mode':<11}" + "".join(f"{m:>9}" for m in METRICS)]
    for system, modes in results.items():
        for mode, metrics in modes.items():
            lines.append(f"{system:<28}{mode:<11}" + "".join(f"{metrics[m]:>9.4f}" for m in METRICS))
    return "\n".join(lines)


def write_report(
    results: dict[str, dict[str, dict[str, float]]], out_dir: Path, context: dict[str, Any]
) -> Path:
    """report.json and report.png (grouped bars: metric x system/mode) in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({"results": results, **context}, indent=2))
    bars = [(f"{s} / {m}", metrics) for s, modes in results.items() for m, metrics in modes.items()]
    fig, ax = plt.subplots(figsize=(1.6 * len(METRICS) + 2, 4.5))
    width = 0.8 / len(bars)
    for i, (label, metrics) in enumerate(bars):
        xs = np.arange(len(METRICS)) + i * width - 0.4 + width / 2
        ax.bar(xs, [metrics[m] for m in METRICS], width, label=label)
    ax.set_xticks(np.arange(len(METRICS)), METRICS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("retrieval quality: dense vs two-stage")
    fig.tight_layout()
    chart = out_dir / "report.png"
    fig.savefig(chart, dpi=110)
    plt.close(fig)
    return chart
