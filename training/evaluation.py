"""Retrieval evaluation: dense, BM25 and hybrid recall, each with and without reranking.

Metrics come from `ir_measures` (pytrec_eval underneath): nDCG@10, RR@10 (MRR@10),
R@10, R@100 and AP over the top-K. Recall runs in a throwaway Qdrant Edge shard with exact
dense search over the whole evaluation corpus (so the numbers measure the models, not an
index), BM25 and RRF computed by the engine as in serving; the reranker reorders each
recall's top-K, the way `/v1/search` does. The report is JSON, a PNG
bar chart and a printed table.
"""

import json
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.core.progress import progress
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.search.fusion import RerankFusion, rerank_order
from twostage.retrieval.search.two_stage import Deployment, SearchPlan, SearchQuery, run_plan
from twostage.retrieval.store.sparse import Bm25Params, RecallMode, Rrf, SparseManifest, sparse_encoder
from twostage.retrieval.store.vector_store import CollectionManifest, Point, VectorStore
from twostage.training.data import Pair

METRICS = ("nDCG@10", "RR@10", "R@10", "R@100", "AP")
EMBED_BLOCK = 512  # documents per progress step


@dataclass
class EvalSet:
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    instructions: dict[str, str] = field(default_factory=dict)  # a query's own, as its pair carries it


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
    instructions = {f"q{i}": p.instruction for i, p in enumerate(dev) if p.instruction is not None}
    return EvalSet(queries, corpus, qrels, instructions)


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


def evaluation_runs(
    data: EvalSet,
    embedder: Embedder,
    reranker: Reranker | None,
    *,
    top_k: int = 100,
    instruction: str | None = None,
    recalls: Sequence[RecallMode] = ("dense",),
    rrf: Rrf | None = None,
    bm25: Bm25Params | None = None,
    fusion: RerankFusion | None = None,
    rerank_k: int | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Runs (mode -> query -> {doc: score}) of one (embedder, reranker) pair, for `score_run` and
    per-query comparisons: each recall in `recalls` ("dense",
    "sparse", "hybrid") and, with a reranker, the same recall reranked ("two-stage" is dense
    reranked, the name the gate has always used; "sparse+rerank", "hybrid+rerank"), ordered
    as `/v1/search` orders them (the first `rerank_k` reranked, in `fusion`'s order).

    Recall runs in a throwaway Qdrant Edge shard with exact dense search, so BM25 statistics,
    RRF and filters are the engine's own, as `/v1/search` computes them.
    """
    if not data.queries:
        raise InputError("the evaluation set has no queries")
    runs = recall_runs(data, embedder, recalls, top_k=top_k, instruction=instruction, rrf=rrf, bm25=bm25)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for recall, run in runs.items():
        out[recall] = run
        if reranker is not None:
            desc = _rerank_desc(rerank_k or top_k, recall)
            scores = rerank_run(data, best(run, rerank_k), reranker, instruction, desc)
            out[reranked_mode(recall)] = fused_run(run, scores, fusion, rerank_k)
    return out


def comparisons(
    qrels: dict[str, dict[str, int]], runs: dict[str, dict[str, dict[str, dict[str, float]]]], measure: str
) -> list[dict[str, Any]]:
    """Paired tests (`training.paired`) of every comparison a report can draw from `runs` (system ->
    mode -> run): within a system, each recall against the first one (dense vs hybrid) and each
    recall against itself reranked (hybrid vs hybrid+rerank); across systems, each mode of each
    later system against the first system's (base vs candidate)."""
    from twostage.training.paired import paired_test, per_query

    scored = {(s, m): per_query(qrels, run, measure) for s, modes in runs.items() for m, run in modes.items()}
    pairs: list[tuple[tuple[str, str], tuple[str, str]]] = []
    for system, modes in runs.items():
        recalls = [m for m in modes if m in ("dense", "sparse", "hybrid")]
        pairs += [((system, recalls[0]), (system, m)) for m in recalls[1:]]
        pairs += [((system, m), (system, reranked_mode(m))) for m in recalls if reranked_mode(m) in modes]
    first, *others = runs
    pairs += [((first, m), (other, m)) for other in others for m in runs[other] if m in runs[first]]
    out = []
    for a, b in pairs:
        test = paired_test(scored[a], scored[b])
        out.append({"baseline_run": "/".join(a), "candidate_run": "/".join(b), "measure": measure,
                    **test.as_dict(), "summary": test.summary(measure)})  # fmt: skip
    return out


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """One line per paired comparison: gain, its 95% interval and p."""
    lines = [f"{'baseline':<26}{'candidate':<26}{'gain':>9}{'95% CI':>22}{'p':>9}"]
    for r in rows:
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(
            f"{r['baseline_run']:<26}{r['candidate_run']:<26}{r['gain']:>+9.4f}{ci:>22}{r['p_value']:>9.4f}"
        )
    return "\n".join(lines)


def reranked_mode(recall: str) -> str:
    return "two-stage" if recall == "dense" else f"{recall}+rerank"


def recall_runs(
    data: EvalSet,
    embedder: Embedder,
    recalls: Sequence[RecallMode],
    *,
    top_k: int,
    instruction: str | None,
    rrf: Rrf | None = None,
    bm25: Bm25Params | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """recall -> (query -> {doc: score}) over the whole corpus, top `top_k` per query."""
    from twostage.retrieval.store.edge import EdgeStore

    doc_ids = list(data.corpus)
    sparse = SparseManifest(params=bm25 or Bm25Params()) if set(recalls) - {"dense"} else None
    encoder = sparse_encoder(sparse)
    manifest = CollectionManifest(
        name="eval", version=1, embedder=embedder.model_id, embedder_model=embedder.model_id,
        dim=embedder.dim, chunker={}, sparse=sparse, payload_indexes={},
    )  # fmt: skip
    query_ids = list(data.queries)
    runs: dict[str, dict[str, dict[str, float]]] = {r: {} for r in recalls}
    with tempfile.TemporaryDirectory(prefix="twostage-eval-") as tmp:
        store = EdgeStore(Path(tmp))
        try:
            store.create_collection(manifest)
            for start in progress(
                range(0, len(doc_ids), EMBED_BLOCK), desc=f"embed {len(doc_ids)} documents", unit="block"
            ):
                block = doc_ids[start : start + EMBED_BLOCK]
                texts = [data.corpus[d] for d in block]
                vectors = embedder.embed_documents(texts)
                sparse_vectors = encoder.embed_documents(texts) if encoder else [None] * len(texts)
                store.upsert(
                    manifest.collection,
                    [
                        Point(str(uuid.UUID(int=start + i)), v, {"d": d}, sv)
                        for i, (d, v, sv) in enumerate(zip(block, vectors, sparse_vectors, strict=True))
                    ],
                )
            store.optimize(manifest.collection)
            groups: dict[str | None, list[str]] = {}  # the serving embedder's prompt for each instruction
            for qid in query_ids:
                groups.setdefault(data.instructions.get(qid, instruction), []).append(qid)
            vectors_of: dict[str, np.ndarray] = {}
            for task, qids in groups.items():
                vectors_of.update(
                    zip(qids, embedder.embed_queries([data.queries[q] for q in qids], task), strict=True)
                )
            for qid in query_ids:
                vector = vectors_of[qid]
                sparse_query = encoder.embed_query(data.queries[qid]) if encoder else None
                for recall in recalls:
                    hits = store.search(
                        manifest.collection,
                        None if recall == "sparse" else vector,
                        top_k,
                        exact=True,
                        sparse=None if recall == "dense" else sparse_query,
                        fusion=(rrf or Rrf(60)) if recall == "hybrid" else None,
                    )
                    runs[recall][qid] = {str(h.payload["d"]): h.score for h in hits}
        finally:
            store.close()
    return runs


def rerank_run(
    data: EvalSet,
    run: dict[str, dict[str, float]],
    reranker: Reranker,
    instruction: str | None,
    desc: str = "rerank",
) -> dict[str, dict[str, float]]:
    """The reranker's scores for each query's recalled documents."""
    reranked: dict[str, dict[str, float]] = {}
    for qid in progress(list(data.queries), desc=desc, unit="query"):
        docs = list(run.get(qid, {}))
        scores = (
            reranker.score(
                data.queries[qid], [data.corpus[d] for d in docs], data.instructions.get(qid, instruction)
            )
            if docs
            else []
        )
        reranked[qid] = {d: float(s) for d, s in zip(docs, scores, strict=True)}
    return reranked


def _rerank_desc(depth: int, recall: str) -> str:
    """The progress bar's label for reranking the first `depth` of a `recall` run."""
    return f"rerank top {depth}" + ("" if recall == "dense" else f" of {recall}")


def best(run: dict[str, dict[str, float]], k: int | None) -> dict[str, dict[str, float]]:
    """Each query's best `k` documents of a run (what a reranker of depth `k` sees); None: all."""
    if k is None:
        return run
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:k]) for q, docs in run.items()}


def fused_run(
    recall: dict[str, dict[str, float]],
    scores: dict[str, dict[str, float]],
    fusion: RerankFusion | None,
    depth: int | None = None,
) -> dict[str, dict[str, float]]:
    """The reranked run `/v1/search` serves: each query's first `depth` recalled documents (all
    with None) in `fusion.rerank_order` of their reranker `scores`, then the rest in recall
    order, as descending rank scores."""
    out: dict[str, dict[str, float]] = {}
    for qid, docs in recall.items():
        ordered = sorted(docs, key=lambda d: -docs[d])  # stable: ties keep the run's order
        head = ordered if depth is None else ordered[:depth]
        order = rerank_order([scores[qid][d] for d in head], fusion)
        ranking = [head[i] for i in order] + ordered[len(head) :]
        out[qid] = {d: float(len(ranking) - rank) for rank, d in enumerate(ranking)}
    return out


def evaluate_index(
    dev: Sequence[Pair],
    relevant: Sequence[str],
    deployment: Deployment,
    store: VectorStore,
    *,
    top_k: int,
    recall: RecallMode = "dense",
    rrf: Rrf | None = None,
    instruction: str | None = None,
    fusion: RerankFusion | None = None,
    rerank_k: int | None = None,
) -> dict[str, dict[str, float]]:
    """The same metrics end to end through the index: the search component as `/v1/search` runs it,
    one hit per document (`group_by_doc`), judged by document id: `relevant[i]` is the id of
    the document that holds pair i's positive passage. Modes: `recall` and its reranked mode.
    """
    if not dev:
        raise InputError("no dev pairs to evaluate with")
    qrels = {f"q{i}": {doc_id: 1} for i, doc_id in enumerate(relevant)}
    first, second = recall, reranked_mode(recall)
    rerank = deployment.reranker is not None
    plan = SearchPlan(recall, rerank, rrf or Rrf(60), fusion=fusion, rerank_k=rerank_k)
    runs: dict[str, dict[str, dict[str, float]]] = {first: {}, second: {}}
    for i, pair in enumerate(dev):
        request = SearchQuery(
            pair.query,
            top_k=top_k,
            top_n=top_k,
            instruction=pair.instruction or instruction,
            group_by_doc=True,
        )
        result = run_plan(deployment, store, request, plan)
        runs[first][f"q{i}"] = {h.doc_id: h.recall_score for h in result.hits}
        runs[second][f"q{i}"] = {h.doc_id: float(len(result.hits) - h.rank) for h in result.hits}
    return {mode: score_run(qrels, run) for mode, run in runs.items()}


class PairRuns:
    """Runs of (embedder, reranker) pairs on one evaluation set, each computed once.

    Recall runs belong to an embedder and reranked runs to an (embedder, reranker) pair, so a
    gate that compares deployed, candidate and mixed pairs never embeds the corpus or reranks a
    query list twice. Models come from the caller's `ModelCache` (shared with the service).
    """

    def __init__(
        self,
        data: EvalSet,
        load_pair: Callable[[str, str], tuple[Embedder, Reranker]],
        *,
        recalls: Sequence[RecallMode],
        served: RecallMode,
        top_k: int,
        rrf: Rrf | None = None,
        bm25: Bm25Params | None = None,
        fusion: RerankFusion | None = None,
        rerank_k: int | None = None,
    ) -> None:
        self.data, self.load_pair, self.recalls, self.served = data, load_pair, tuple(recalls), served
        self.top_k, self.rrf, self.bm25, self.fusion, self.rerank_k = top_k, rrf, bm25, fusion, rerank_k
        self._recall: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        self._reranked: dict[tuple[str, str], dict[str, dict[str, float]]] = {}

    def run(self, embedder: str, reranker: str, mode: str) -> dict[str, dict[str, float]]:
        """query -> {doc: score} of `mode` (a recall, or the served recall's reranked mode)."""
        if embedder not in self._recall:
            model, _ = self.load_pair(embedder, reranker)
            self._recall[embedder] = recall_runs(
                self.data,
                model,
                self.recalls,
                top_k=self.top_k,
                instruction=None,
                rrf=self.rrf,
                bm25=self.bm25,
            )
        if mode in self._recall[embedder]:
            return self._recall[embedder][mode]
        if mode != reranked_mode(self.served):
            raise ValueError(f"mode {mode!r} is not evaluated here")
        if (embedder, reranker) not in self._reranked:
            first = self._recall[embedder][self.served]
            desc = _rerank_desc(self.rerank_k or self.top_k, self.served)
            scorer = self.load_pair(embedder, reranker)[1]
            scores = rerank_run(self.data, best(first, self.rerank_k), scorer, None, desc)
            self._reranked[embedder, reranker] = fused_run(first, scores, self.fusion, self.rerank_k)
        return self._reranked[embedder, reranker]

    def modes(self) -> list[str]:
        return [*self.recalls, reranked_mode(self.served)]

    def metrics(self, embedder: str, reranker: str) -> dict[str, dict[str, float]]:
        return {m: score_run(self.data.qrels, self.run(embedder, reranker, m)) for m in self.modes()}

    def per_query(self, embedder: str, reranker: str, mode: str, measure: str) -> dict[str, float]:
        from twostage.training.paired import per_query

        return per_query(self.data.qrels, self.run(embedder, reranker, mode), measure)


def score_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """METRICS of a run (query -> {doc: score}) against qrels, via ir_measures."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in METRICS]
    values = ir_measures.calc_aggregate(measures, qrels, run)
    return {str(k): float(v) for k, v in sorted(values.items(), key=lambda kv: METRICS.index(str(kv[0])))}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (system, mode)."""
    lines = [f"{'system':<28}{'mode':<15}" + "".join(f"{m:>9}" for m in METRICS)]
    for system, modes in results.items():
        for mode, metrics in modes.items():
            lines.append(f"{system:<28}{mode:<15}" + "".join(f"{metrics[m]:>9.4f}" for m in METRICS))
    return "\n".join(lines)


def chart_title(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """What the chart compares: its modes (dense vs hybrid vs hybrid+rerank), and its systems."""
    modes = list(dict.fromkeys(m for modes in results.values() for m in modes))
    title = "retrieval quality: " + " vs ".join(modes)
    return title + (f"\n({' vs '.join(results)})" if len(results) > 1 else "")


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
    ax.set_title(chart_title(results), fontsize=10)
    fig.tight_layout()
    chart = out_dir / "report.png"
    fig.savefig(chart, dpi=110)
    plt.close(fig)
    return chart
